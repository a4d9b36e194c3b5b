//! `fleet/...`: N QEMUs (`-M none -accel tcg`) launched, queried (`query-status`) and shut
//! down by `machine_core::Fleet` from one thread, for N = 10, 50, 100, 200, beside the raw
//! one-thread floor measured in the same rounds:
//! socketpairs, every QEMU spawned at once, one `poll(2)` over all monitors, the fewest bytes
//! (greeting, `qmp_capabilities`, `query-status`, `quit`), no library. The same N driven one
//! machine at a time through `machine_core::Machine` is a row of its own (no target).
//! Targets: N = 100 all reaped within 1.05x the floor, one client thread, at most 1 ms of
//! client CPU per machine; N = 200 peak client RSS at most 20 MB; everywhere 0 foreign fds,
//! 0 failed shutdowns, 0 leaks.
//!
//! Each side of each round runs in a fresh child process (this binary, `bench --fleet-child`),
//! so its thread count, CPU time and peak RSS are its own and nothing of an earlier round
//! (or group) is counted. The child reports, as one JSON line: wall time from the first spawn
//! to all negotiated, all queried and all reaped; the most threads it had; its CPU time; its
//! peak RSS (`VmHWM`); how many fds of one QEMU were open in another QEMU or were our own
//! sockets (read from `/proc/PID/fd` of every member once all are negotiated); how many
//! QEMUs did not exit with status 0 after `quit`; and what it leaked (children, fds).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use machine_core::{Fleet, Machine, MachineBuilder, MemberId};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::{json, Value};

use super::{Cpu, Figure, Settings, Target};

/// The hidden flag that makes `bench` run one side of one round and print its result.
pub const CHILD_FLAG: &str = "--fleet-child";

/// How long one side of one round may take before it counts as failed.
const ROUND_DEADLINE: Duration = Duration::from_secs(120);

/// The QEMU arguments every side uses besides its monitor.
const QEMU_ARGS: [&str; 5] = ["-nodefaults", "-machine", "none", "-accel", "tcg"];

/// The sides a child can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Socketpairs, spawn all, one poll, minimal bytes, no library.
    Raw,
    /// `machine_core::Machine`, one machine at a time.
    Sequential,
    /// `machine_core::Fleet`: all machines from one thread.
    Fleet,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Raw => "raw",
            Side::Sequential => "sequential",
            Side::Fleet => "fleet",
        }
    }

    fn parse(text: &str) -> Option<Side> {
        [Side::Raw, Side::Sequential, Side::Fleet]
            .into_iter()
            .find(|s| s.name() == text)
    }
}

/// What one side of one round measured (the child's JSON line).
#[derive(Debug, Clone, Default)]
struct Outcome {
    negotiated_ms: f64,
    queried_ms: f64,
    reaped_ms: f64,
    threads: u64,
    cpu: Cpu,
    peak_rss_kb: u64,
    foreign_fds: u64,
    failed_shutdowns: u64,
    leaks: Vec<String>,
}

impl Outcome {
    fn to_json(&self) -> Value {
        json!({
            "negotiated_ms": self.negotiated_ms,
            "queried_ms": self.queried_ms,
            "reaped_ms": self.reaped_ms,
            "threads": self.threads,
            "cpu_total_ns": self.cpu.total.as_nanos() as u64,
            "cpu_user_us": self.cpu.user.as_micros() as u64,
            "cpu_system_us": self.cpu.system.as_micros() as u64,
            "peak_rss_kb": self.peak_rss_kb,
            "foreign_fds": self.foreign_fds,
            "failed_shutdowns": self.failed_shutdowns,
            "leaks": self.leaks,
        })
    }

    fn from_json(value: &Value) -> Result<Outcome, String> {
        let f = |key: &str| {
            value[key]
                .as_f64()
                .ok_or_else(|| format!("child result has no `{key}`: {value}"))
        };
        let u = |key: &str| f(key).map(|v| v as u64);
        Ok(Outcome {
            negotiated_ms: f("negotiated_ms")?,
            queried_ms: f("queried_ms")?,
            reaped_ms: f("reaped_ms")?,
            threads: u("threads")?,
            cpu: Cpu {
                total: Duration::from_nanos(u("cpu_total_ns")?),
                user: Duration::from_micros(u("cpu_user_us")?),
                system: Duration::from_micros(u("cpu_system_us")?),
            },
            peak_rss_kb: u("peak_rss_kb")?,
            foreign_fds: u("foreign_fds")?,
            failed_shutdowns: u("failed_shutdowns")?,
            leaks: value["leaks"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|l| l.as_str().unwrap_or("?").to_string())
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// Measures the fleet figures selected by `settings`.
pub fn run(settings: &Settings) -> Result<Vec<Figure>, String> {
    let counts: &[usize] = if settings.quick {
        &[4]
    } else {
        &[10, 50, 100, 200]
    };
    let rounds = settings.pick(3, 1);
    let mut figures = Vec::new();
    for &n in counts {
        let mut ours = Figure::new(
            format!("fleet/{n}/reaped"),
            format!("{n} x launch -> query -> quit, all reaped, one thread"),
            "ms",
            "machine_core::Fleet",
            "raw one-thread floor",
            if n == 100 {
                Target::RatioAtMost(1.05)
            } else {
                Target::Report
            },
        );
        let mut seq = Figure::new(
            format!("fleet/{n}/sequential"),
            format!("{n} x launch -> query -> quit, all reaped, one at a time"),
            "ms",
            "machine_core::Machine, one after another",
            "raw one-thread floor",
            Target::Report,
        );
        let want_ours = settings.wants(&ours.id, &ours.name);
        let want_seq = settings.wants(&seq.id, &seq.name);
        if !want_ours && !want_seq {
            continue;
        }
        let mut sides = vec![Side::Raw];
        if want_ours {
            sides.push(Side::Fleet);
        }
        if want_seq {
            sides.push(Side::Sequential);
        }
        let mut all: BTreeMap<&'static str, Vec<Outcome>> = BTreeMap::new();
        for round in 0..rounds {
            // Rotate which side goes first, so a trend in the machine's load hits all alike.
            let mut order = sides.clone();
            order.rotate_left(round % sides.len());
            for side in order {
                let outcome = spawn_child(side, n, &settings.scratch)?;
                match side {
                    Side::Raw => {
                        ours.baseline.push(outcome.reaped_ms, outcome.cpu, n);
                        seq.baseline.push(outcome.reaped_ms, outcome.cpu, n);
                    }
                    Side::Fleet => ours.ours.push(outcome.reaped_ms, outcome.cpu, n),
                    Side::Sequential => seq.ours.push(outcome.reaped_ms, outcome.cpu, n),
                }
                all.entry(side.name()).or_default().push(outcome);
            }
        }
        let raw = all.remove("raw").unwrap_or_default();
        if want_ours {
            let fleet = all.remove("fleet").unwrap_or_default();
            describe(&mut ours, "raw floor", &raw);
            describe(&mut ours, "fleet", &fleet);
            let threads = fleet.iter().map(|o| o.threads).max().unwrap_or(0);
            ours.check(
                format!("fleet: {threads} client thread(s) at most (target 1)"),
                threads == 1,
            );
            if n == 100 {
                let cpu_ms = super::Spread::of(
                    &fleet
                        .iter()
                        .map(|o| o.cpu.total.as_secs_f64() * 1e3 / n as f64)
                        .collect::<Vec<_>>(),
                )
                .median;
                ours.check(
                    format!("fleet: client CPU {cpu_ms:.3} ms per machine (target <= 1 ms)"),
                    cpu_ms <= 1.0,
                );
            }
            if n == 200 {
                let rss = fleet.iter().map(|o| o.peak_rss_kb).max().unwrap_or(0) as f64 / 1024.0;
                ours.check(
                    format!("fleet: peak client RSS {rss:.1} MB (target <= 20 MB)"),
                    rss <= 20.0,
                );
            }
            figures.push(ours);
        }
        if want_seq {
            let sequential = all.remove("sequential").unwrap_or_default();
            if !want_ours {
                describe(&mut seq, "raw floor", &raw);
            }
            describe(&mut seq, "sequential", &sequential);
            figures.push(seq);
        }
    }
    Ok(figures)
}

/// Adds a side's phases, threads, RSS and correctness to a figure's notes and checks.
fn describe(figure: &mut Figure, side: &str, all: &[Outcome]) {
    let med =
        |f: fn(&Outcome) -> f64| super::Spread::of(&all.iter().map(f).collect::<Vec<_>>()).median;
    figure.notes.push(format!(
        "{side}: all negotiated {:.1} ms, all queried {:.1} ms, all reaped {:.1} ms; \
         {} client thread(s) at most; peak client RSS {:.1} MB (medians)",
        med(|o| o.negotiated_ms),
        med(|o| o.queried_ms),
        med(|o| o.reaped_ms),
        all.iter().map(|o| o.threads).max().unwrap_or(0),
        med(|o| o.peak_rss_kb as f64) / 1024.0,
    ));
    let foreign: u64 = all.iter().map(|o| o.foreign_fds).sum();
    figure.check(
        format!("{side}: {foreign} foreign fds in any QEMU (target 0)"),
        foreign == 0,
    );
    let failed: u64 = all.iter().map(|o| o.failed_shutdowns).sum();
    figure.check(
        format!("{side}: {failed} failed shutdowns (target 0)"),
        failed == 0,
    );
    let leaks: Vec<&String> = all.iter().flat_map(|o| &o.leaks).collect();
    figure.check(
        format!("{side}: {} leaks {leaks:?} (target 0)", leaks.len()),
        leaks.is_empty(),
    );
}

/// Runs one side of one round in a child process and reads its result.
fn spawn_child(side: Side, n: usize, scratch: &Path) -> Result<Outcome, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = scratch.join(format!("fleet-{}-{n}", side.name()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut child = Command::new(exe)
        .args(["bench", CHILD_FLAG, side.name(), &n.to_string()])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the {} child: {e}", side.name()))?;
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut text)
            .map_err(|e| format!("reading the {} child: {e}", side.name()))?;
    }
    let status = child.wait().map_err(|e| format!("wait: {e}"))?;
    if !status.success() {
        return Err(format!(
            "the {} child (N={n}) failed: {status}",
            side.name()
        ));
    }
    let value: Value = serde_json::from_str(text.trim())
        .map_err(|e| format!("the {} child printed {text:?}: {e}", side.name()))?;
    Outcome::from_json(&value)
}

/// The child: `bench --fleet-child SIDE N DIR`. Prints one JSON line.
pub fn child(args: &[String]) -> Result<(), String> {
    let [side, n, dir] = args else {
        return Err(format!("usage: bench {CHILD_FLAG} raw|sequential N DIR"));
    };
    let side = Side::parse(side).ok_or_else(|| format!("unknown side {side}"))?;
    let n: usize = n.parse().map_err(|e| format!("N: {e}"))?;
    let dir = PathBuf::from(dir);
    let before = crate::e2e::Snapshot::take();
    let environment: BTreeSet<String> = fd_targets("/proc/self/fd").into_iter().collect();
    let mut outcome = match side {
        Side::Raw => raw(n, &environment)?,
        Side::Sequential => sequential(n, &dir, &environment)?,
        Side::Fleet => fleet(n, &dir, &environment)?,
    };
    outcome.peak_rss_kb = status_field("VmHWM:");
    outcome.leaks = crate::e2e::Snapshot::take().leaks_since(&before);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        outcome.leaks.extend(
            entries
                .flatten()
                .map(|e| format!("temp entry {}", e.path().display())),
        );
    }
    println!("{}", outcome.to_json());
    Ok(())
}

/// A field of `/proc/self/status` in its unit (kB for sizes), 0 if missing.
fn status_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The sockets and pipes this process has open, by inode (`socket:[N]`, `pipe:[N]`).
pub fn fd_targets(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string())
        .filter(|t| t.starts_with("socket:") || t.starts_with("pipe:"))
        .collect()
}

/// Counts the fds of each QEMU in `pids` that are open in another member too, or that are
/// sockets this process holds: one machine's sockets or pipes reaching another machine.
/// Sockets are told apart by inode (each end of a socketpair has its own); a pipe's two ends
/// share one, so our end of a member's output pipe is not counted against it. What this
/// process inherited from its parent (`environment`, read before the first spawn) belongs to
/// no machine and is left out: `std::process::Command`, which the raw floor uses, passes such
/// fds on to every child (they are not close-on-exec), `machine_core` does not.
pub fn foreign_fds(pids: &[u32], environment: &BTreeSet<String>) -> u64 {
    let targets = |dir: &str| -> Vec<String> {
        fd_targets(dir)
            .into_iter()
            .filter(|t| !environment.contains(t))
            .collect()
    };
    let ours: BTreeSet<String> = targets("/proc/self/fd")
        .into_iter()
        .filter(|t| t.starts_with("socket:"))
        .collect();
    let tables: Vec<Vec<String>> = pids
        .iter()
        .map(|pid| targets(&format!("/proc/{pid}/fd")))
        .collect();
    let mut holders: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    for (i, table) in tables.iter().enumerate() {
        for target in table {
            holders.entry(target).or_default().insert(i);
        }
    }
    let foreign: Vec<&String> = tables
        .iter()
        .flatten()
        .filter(|t| ours.contains(*t) || holders.get(t.as_str()).is_some_and(|h| h.len() > 1))
        .collect();
    if !foreign.is_empty() {
        log::warn!("fds of one QEMU open elsewhere: {foreign:?}");
    }
    foreign.len() as u64
}

/// A side's measurement in progress: wall clock, CPU clock and the most threads seen.
struct Clock {
    start: Instant,
    cpu0: Cpu,
    threads: u64,
    negotiated: Duration,
    queried: Duration,
}

impl Clock {
    fn start() -> Clock {
        Clock {
            start: Instant::now(),
            cpu0: Cpu::process(),
            threads: 0,
            negotiated: Duration::ZERO,
            queried: Duration::ZERO,
        }
    }

    /// Updates the most threads seen with the current count.
    fn note_threads(&mut self) {
        self.threads = self.threads.max(status_field("Threads:"));
    }

    /// All members negotiated now.
    fn negotiated(&mut self) {
        self.negotiated = self.start.elapsed();
        self.note_threads();
    }

    /// All members answered `query-status` now.
    fn queried(&mut self) {
        self.queried = self.start.elapsed();
        self.note_threads();
    }

    /// All members reaped now: the outcome.
    fn reaped(mut self, foreign_fds: u64, failed_shutdowns: u64) -> Outcome {
        let reaped = self.start.elapsed();
        self.note_threads();
        Outcome {
            negotiated_ms: ms(self.negotiated),
            queried_ms: ms(self.queried),
            reaped_ms: ms(reaped),
            threads: self.threads,
            cpu: Cpu::process().since(self.cpu0),
            foreign_fds,
            failed_shutdowns,
            ..Outcome::default()
        }
    }
}

/// One QEMU of the raw floor.
struct RawMember {
    child: Child,
    stream: UnixStream,
    /// Bytes read and not yet split into lines.
    buf: Vec<u8>,
    /// Lines still awaited in the current phase (greeting + capabilities reply = 2).
    waiting: usize,
}

/// The raw floor: spawn all, then one `poll(2)` loop per phase over all monitors.
fn raw(n: usize, environment: &BTreeSet<String>) -> Result<Outcome, String> {
    let mut clock = Clock::start();
    let deadline = clock.start + ROUND_DEADLINE;
    let mut members = Vec::with_capacity(n);
    for _ in 0..n {
        members.push(raw_spawn().map_err(|e| format!("spawn: {e}"))?);
    }
    // Greeting, then the reply to qmp_capabilities (sent on seeing the greeting).
    for m in &mut members {
        m.waiting = 2;
    }
    raw_phase(&mut members, deadline, |m| {
        if m.waiting == 1 {
            m.stream.write_all(br#"{"execute":"qmp_capabilities"}"#)?;
        }
        Ok(())
    })?;
    clock.negotiated();
    let pids: Vec<u32> = members.iter().map(|m| m.child.id()).collect();
    let foreign = foreign_fds(&pids, environment);
    for m in &mut members {
        m.stream
            .write_all(br#"{"execute":"query-status"}"#)
            .map_err(|e| e.to_string())?;
        m.waiting = 1;
    }
    raw_phase(&mut members, deadline, |_| Ok(()))?;
    clock.queried();
    for m in &mut members {
        m.stream
            .write_all(br#"{"execute":"quit"}"#)
            .map_err(|e| e.to_string())?;
    }
    let mut failed = 0;
    for m in &mut members {
        if !m.child.wait().map_err(|e| e.to_string())?.success() {
            failed += 1;
        }
    }
    Ok(clock.reaped(foreign, failed))
}

/// Spawns one QEMU with its monitor on a socketpair (its end made inheritable just for this
/// spawn and closed right after, so no sibling inherits it).
fn raw_spawn() -> io::Result<RawMember> {
    let (ours, theirs) = UnixStream::pair()?;
    fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty())).map_err(io::Error::from)?;
    let child = super::lifecycle::raw_command(theirs.as_raw_fd()).spawn()?;
    drop(theirs);
    ours.set_nonblocking(true)?;
    Ok(RawMember {
        child,
        stream: ours,
        buf: Vec::new(),
        waiting: 0,
    })
}

/// Polls all members until each has received the lines it waits for; `on_line` runs after
/// each counted line (events do not count). QEMU's replies here are short single lines.
fn raw_phase(
    members: &mut [RawMember],
    deadline: Instant,
    mut on_line: impl FnMut(&mut RawMember) -> io::Result<()>,
) -> Result<(), String> {
    let mut chunk = [0u8; 4096];
    loop {
        let open: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].waiting > 0)
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{} QEMUs did not answer in time", open.len()));
        }
        let mut fds: Vec<PollFd<'_>> = open
            .iter()
            .map(|&i| PollFd::new(members[i].stream.as_fd(), PollFlags::POLLIN))
            .collect();
        let timeout =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready: Vec<usize> = fds
            .iter()
            .zip(&open)
            .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, &i)| i)
            .collect();
        drop(fds);
        for i in ready {
            let m = &mut members[i];
            loop {
                match m.stream.read(&mut chunk) {
                    Ok(0) => return Err("a QEMU closed its monitor".into()),
                    Ok(got) => m.buf.extend_from_slice(&chunk[..got]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
            while let Some(end) = m.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = m.buf.drain(..=end).collect();
                if memchr_event(&line) || m.waiting == 0 {
                    continue;
                }
                m.waiting -= 1;
                on_line(m).map_err(|e| format!("write: {e}"))?;
            }
        }
    }
}

/// Whether a line is an event (`{"timestamp": ..., "event": ...}`), not the awaited line.
fn memchr_event(line: &[u8]) -> bool {
    line.windows(8).any(|w| w == b"\"event\":")
}

/// The machines of the library sides: `-M none` under TCG, temp dirs under `dir`.
fn machines(n: usize, dir: &Path) -> Vec<Machine> {
    (0..n)
        .map(|i| {
            MachineBuilder::new(crate::qemu::binary())
                .name(format!("m{i}"))
                .args(QEMU_ARGS)
                .base_temp_dir(dir)
                .build()
        })
        .collect()
}

/// The same N through `machine_core::Fleet`: launch all, query all, shut all down.
fn fleet(n: usize, dir: &Path, environment: &BTreeSet<String>) -> Result<Outcome, String> {
    let mut clock = Clock::start();
    let mut fleet = Fleet::new().map_err(|e| format!("fleet: {e}"))?;
    for m in machines(n, dir) {
        fleet.add(m);
    }
    for (id, result) in fleet.launch_all() {
        result.map_err(|e| format!("launch {id}: {e}"))?;
    }
    clock.negotiated();
    let ids: Vec<MemberId> = fleet.ids().collect();
    let pids: Vec<u32> = ids
        .iter()
        .filter_map(|&id| fleet.machine(id).pid())
        .collect();
    let foreign = foreign_fds(&pids, environment);
    for (id, reply) in fleet.qmp_all(&ids, "query-status", (), Duration::from_secs(30)) {
        let reply = reply.map_err(|e| format!("query-status on {id}: {e}"))?;
        if reply["return"]["status"] != "running" {
            return Err(format!("query-status on {id} returned {reply}"));
        }
    }
    clock.queried();
    let failed = fleet
        .shutdown_all(Duration::from_secs(30))
        .into_iter()
        .filter(|(_, r)| !r.as_ref().is_ok_and(|report| report.status.success()))
        .count() as u64;
    let outcome = clock.reaped(foreign, failed);
    drop(fleet);
    Ok(outcome)
}

/// The same N through the single-machine API: launch each in turn, then query each, then
/// shut each down.
fn sequential(n: usize, dir: &Path, environment: &BTreeSet<String>) -> Result<Outcome, String> {
    let mut clock = Clock::start();
    let mut machines = machines(n, dir);
    for m in &mut machines {
        m.launch().map_err(|e| format!("launch: {e}"))?;
    }
    clock.negotiated();
    let pids: Vec<u32> = machines.iter().filter_map(Machine::pid).collect();
    let foreign = foreign_fds(&pids, environment);
    for m in &mut machines {
        let status = m
            .cmd("query-status", ())
            .map_err(|e| format!("query-status: {e}"))?;
        if status["status"] != "running" {
            return Err(format!("query-status returned {status}"));
        }
    }
    clock.queried();
    let mut failed = 0;
    for m in &mut machines {
        match m.shutdown() {
            Ok(report) if report.status.success() => {}
            _ => failed += 1,
        }
    }
    let outcome = clock.reaped(foreign, failed);
    drop(machines);
    Ok(outcome)
}
