//! The real-QEMU end-to-end suite: every scenario runs against `qemu-system-x86_64`.
//!
//! Each area of the workspace adds its scenarios in its own module (`client`, `console`,
//! `machine`, `cli`, `qtest`, `guest`, `linux`) by returning them from `scenarios()`.
//!
//! # How a run goes
//!
//! `cargo xtask e2e [--accel tcg|kvm|both] [--filter TEXT]` makes sure QEMU is installed, prints
//! its version, the accelerators built in and whether KVM really works, then runs every
//! scenario whose name contains TEXT under each requested accelerator it supports. Each run of a
//! scenario:
//!
//! - happens on its own thread with its own deadline ([`Ctx::deadline`]); if it overruns it
//!   FAILs with "timed out", the QEMU processes it left are killed, and the suite goes on;
//! - gets an empty scratch directory ([`Ctx::scratch`]) under the run's directory;
//! - is checked for leaks before and after: no child process of ours (QEMU or zombie) may
//!   survive it, our own fd table must be unchanged, the scratch directory must hold no sockets
//!   or directories, and the run's private `$TMPDIR` must be empty again. A leak fails it.
//!
//! The whole run sets `$TMPDIR` to a private directory under the original one (so anything a
//! library or QEMU puts in "the temp dir" is caught), checks the run as a whole the same way at
//! the end, removes its directory (kept when `XTASK_E2E_KEEP=1`), and prints one pass/FAIL line
//! per scenario, its notes (measurements) indented below, and `N passed, N failed`.
//!
//! # Helpers for scenario authors
//!
//! - [`socketpair`]: our end as a `UnixStream`, QEMU's end as an `OwnedFd`;
//! - [`QemuCommand`]: build a QEMU command line, hand fds over as fixed numbers
//!   ([`QemuCommand::pass_fd`] returns the number QEMU sees, 3 upwards), and spawn it with
//!   stdout/stderr going to a log file in the scratch directory;
//! - [`QemuChild`]: the running QEMU; killed and reaped on drop; [`QemuChild::wait_until`];
//! - [`Ctx::write_guest_kernel`], [`Ctx::note`], [`Ctx::remaining`], [`Ctx::accel_args`];
//! - `guest::GuestVm` (in `guest.rs`): the tiny guest booted with its console and QMP on
//!   socketpairs, and a raw QMP reader for scenarios that want no client library.

mod cli;
mod client;
mod console;
mod guest;
pub(crate) use guest::RawQmp;
pub(crate) mod linux;
mod machine;
mod mux;
mod qtest;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// An accelerator a scenario can run under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: the default, fast for our tiny guest.
    Tcg,
    /// KVM (nested and slow for firmware on our machines): opt-in.
    Kvm,
}

impl Accel {
    /// The value for QEMU's `-accel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// What a scenario gets to work with.
pub struct Ctx {
    /// The QEMU binary (possibly a wrapper script around it).
    pub qemu: PathBuf,
    /// Its version number, e.g. `7.2.22`.
    pub qemu_version: String,
    /// The accelerator this run uses.
    pub accel: Accel,
    /// The scenario's deadline: every wait inside must end before it.
    pub deadline: Instant,
    /// A directory of this scenario's own, empty at the start. Regular files (logs, kernel
    /// images) may stay; sockets and directories left behind count as leaks.
    pub scratch: PathBuf,
    /// Measurements and remarks printed under the scenario's result line.
    notes: Arc<Mutex<Vec<String>>>,
    /// Numbers the QEMU log files of this scenario.
    spawned: Arc<Mutex<u32>>,
}

impl Ctx {
    /// A context outside the suite (for `cargo xtask record`): TCG, `qemu` run as it is,
    /// `scratch` as the scratch directory, a deadline `timeout` from now.
    pub fn standalone(
        qemu: PathBuf,
        qemu_version: String,
        scratch: PathBuf,
        timeout: Duration,
    ) -> Ctx {
        Ctx {
            qemu,
            qemu_version,
            accel: Accel::Tcg,
            deadline: Instant::now() + timeout,
            scratch,
            notes: Arc::new(Mutex::new(Vec::new())),
            spawned: Arc::new(Mutex::new(0)),
        }
    }

    /// Time left before the deadline (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Records a line (typically a measurement) printed under the scenario's result line.
    pub fn note(&self, text: impl Into<String>) {
        if let Ok(mut notes) = self.notes.lock() {
            notes.push(text.into());
        }
    }

    /// QEMU's `major.minor`, e.g. `10.0` (what its HMP banner and `info version` start with).
    pub fn qemu_major_minor(&self) -> String {
        let mut parts = self.qemu_version.split('.');
        match (parts.next(), parts.next()) {
            (Some(major), Some(minor)) => format!("{major}.{minor}"),
            _ => self.qemu_version.clone(),
        }
    }

    /// Whether QEMU is `major.minor` or newer (false when the version cannot be read).
    pub fn qemu_at_least(&self, major: u32, minor: u32) -> bool {
        let mut parts = self.qemu_version.split('.').map(|p| p.parse::<u32>().ok());
        match (parts.next().flatten(), parts.next().flatten()) {
            (Some(have_major), Some(have_minor)) => (have_major, have_minor) >= (major, minor),
            _ => false,
        }
    }

    /// `["-accel", "tcg"]` or `["-accel", "kvm"]`.
    pub fn accel_args(&self) -> [&'static str; 2] {
        ["-accel", self.accel.as_str()]
    }

    /// Writes the tiny test guest's kernel into the scratch directory and returns its path.
    pub fn write_guest_kernel(&self) -> Result<PathBuf, String> {
        machine_core::guest::write_kernel(&self.scratch).map_err(|e| {
            format!(
                "cannot write the guest kernel into {}: {e}",
                self.scratch.display()
            )
        })
    }

    /// A new QEMU command line for this scenario (the binary only; add arguments).
    pub fn qemu_command(&self) -> QemuCommand {
        let n = match self.spawned.lock() {
            Ok(mut n) => {
                *n += 1;
                *n
            }
            Err(_) => 0,
        };
        QemuCommand::new(
            self.qemu.clone(),
            self.scratch.join(format!("qemu-{n}.log")),
        )
    }
}

/// Every scenario of the suite, area by area.
pub fn all_scenarios() -> Vec<Scenario> {
    let mut all = Vec::new();
    all.extend(guest::scenarios());
    all.extend(client::scenarios());
    all.extend(console::scenarios());
    all.extend(machine::scenarios());
    all.extend(cli::scenarios());
    all.extend(qtest::scenarios());
    all.extend(linux::scenarios());
    all.extend(mux::scenarios());
    all
}

/// One end-to-end test.
pub struct Scenario {
    /// Unique name, printed on its result line.
    pub name: &'static str,
    /// The accelerators it is meaningful under.
    pub accels: &'static [Accel],
    /// How long it may take in total.
    pub timeout: Duration,
    /// The test body: Err describes the failure.
    pub run: fn(&Ctx) -> Result<(), String>,
}

/// A connected pair of unix stream sockets: ours as a `UnixStream`, the other end as an
/// `OwnedFd` to hand to QEMU with [`QemuCommand::pass_fd`]. Both are close-on-exec.
pub fn socketpair() -> Result<(UnixStream, OwnedFd), String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    Ok((ours, OwnedFd::from(theirs)))
}

/// The first fd number [`QemuCommand::pass_fd`] hands out in the child.
const FIRST_CHILD_FD: RawFd = 3;
/// At most this many fds per QEMU (the child side copies them through a fixed-size array).
const MAX_PASSED_FDS: usize = 16;

/// A QEMU command line being built: arguments and fds to hand over.
pub struct QemuCommand {
    binary: PathBuf,
    args: Vec<OsString>,
    fds: Vec<OwnedFd>,
    log: PathBuf,
}

impl QemuCommand {
    /// A command line running `binary` (QEMU, or another program that needs fds handed over
    /// the same way), its stdout and stderr going to the file `log`.
    pub fn new(binary: PathBuf, log: PathBuf) -> QemuCommand {
        QemuCommand {
            binary,
            args: Vec::new(),
            fds: Vec::new(),
            log,
        }
    }

    /// Appends one argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Hands `fd` to QEMU and returns the number QEMU will see it as (3, 4, ... in call
    /// order), e.g. for `-chardev socket,id=con,fd=N`. Only these fds and stdio reach QEMU,
    /// even fds this process inherited without close-on-exec.
    pub fn pass_fd(&mut self, fd: OwnedFd) -> RawFd {
        self.fds.push(fd);
        FIRST_CHILD_FD + (self.fds.len() as RawFd - 1)
    }

    /// Starts the program (stdin from /dev/null, stdout and stderr to the log file: for a
    /// scenario, `qemu-N.log` in its scratch directory, N counting its spawns).
    /// Our copies of the passed fds are closed once QEMU has its own.
    pub fn spawn(&mut self) -> Result<QemuChild, String> {
        if self.fds.len() > MAX_PASSED_FDS {
            return Err(format!(
                "at most {MAX_PASSED_FDS} fds can be passed, not {}",
                self.fds.len()
            ));
        }
        let log = File::create(&self.log)
            .map_err(|e| format!("cannot create {}: {e}", self.log.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot duplicate the log fd: {e}"))?;
        let mut cmd = std::process::Command::new(&self.binary);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let sources: Vec<RawFd> = self.fds.iter().map(AsRawFd::as_raw_fd).collect();
        sys::map_fds_on_exec(&mut cmd, sources);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        // QEMU has its copies now; ours would only keep the sockets open after it exits.
        self.fds.clear();
        log::debug!("spawned qemu pid {}: {:?}", child.id(), self.args);
        Ok(QemuChild {
            child,
            started,
            log: self.log.clone(),
            status: None,
        })
    }
}

/// A running QEMU, killed (SIGKILL) and reaped when dropped unless it was already reaped.
pub struct QemuChild {
    child: Child,
    started: Instant,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl QemuChild {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When `spawn` was called (just before the exec).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Whether it has exited (reaping it if so), without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, String> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|e| format!("cannot wait for qemu {}: {e}", self.pid()))?;
        }
        Ok(self.status)
    }

    /// Waits for QEMU to exit by `deadline`; Err (with the tail of its log) if it does not.
    /// Checks every millisecond, so measured exit times are good to about 1 ms.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<ExitStatus, String> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "qemu {} still running at the deadline; log: {}",
                    self.pid(),
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kills QEMU (SIGKILL) if it still runs, and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, String> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        // Fails only if it already exited, which the wait below then reports.
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .map_err(|e| format!("cannot reap qemu {}: {e}", self.pid()))?;
        self.status = Some(status);
        Ok(status)
    }

    /// The last 2000 bytes of QEMU's stdout/stderr log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let from = text.len().saturating_sub(2000);
        String::from_utf8_lossy(&text[from..]).trim().to_string()
    }
}

impl Drop for QemuChild {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            log::warn!("{e}");
        }
    }
}

/// Describes an exit status as `exit N` or `signal N`.
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => format!("{status}"),
    }
}

/// Runs the suite against each QEMU asked for (`--qemu system|10.0|11.1|all|PATH`, default
/// `system`); Err if any scenario failed on any of them.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut filter: Option<String> = None;
    let mut accels = vec![Accel::Tcg];
    let mut choices = vec![crate::versions::Choice::System];
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--filter" => {
                filter = Some(
                    it.next()
                        .cloned()
                        .ok_or("--filter takes a text to look for in scenario names")?,
                )
            }
            "--accel" => {
                accels = match it.next().map(String::as_str) {
                    Some("tcg") => vec![Accel::Tcg],
                    Some("kvm") => vec![Accel::Kvm],
                    Some("both") => vec![Accel::Tcg, Accel::Kvm],
                    other => return Err(format!("--accel takes tcg, kvm or both, not {other:?}")),
                }
            }
            "--qemu" => {
                choices = crate::versions::Choice::parse_list(
                    it.next()
                        .ok_or("--qemu takes system, 10.0, 11.1, all or a path")?,
                )
            }
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    let mut results = Vec::new();
    for choice in &choices {
        let started = Instant::now();
        let result = choice
            .ensure()
            .and_then(|qemu| run_suite(&qemu, filter.as_deref(), &accels));
        if let Err(why) = &result {
            eprintln!("e2e --qemu {}: {why}", choice.label());
        }
        results.push((choice.label(), result, started.elapsed()));
    }
    if results.len() > 1 {
        eprintln!("\ne2e summary:");
        for (label, result, elapsed) in &results {
            let verdict = match result {
                Ok(version) => format!("ok   {version}"),
                Err(why) => format!("FAIL {why}"),
            };
            eprintln!(
                "  --qemu {label:<6} {:>6.1} s  {verdict}",
                elapsed.as_secs_f64()
            );
        }
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, result, _)| result.is_err())
        .map(|(label, _, _)| label.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("the suite failed on --qemu {}", failed.join(", ")))
    }
}

/// Runs the suite against one QEMU binary; Ok carries its version number.
fn run_suite(qemu: &Path, filter: Option<&str>, accels: &[Accel]) -> Result<String, String> {
    let version = report_qemu(qemu, accels)?;

    let all = all_scenarios();
    let mut names = std::collections::BTreeSet::new();
    if let Some(dup) = all.iter().find(|s| !names.insert(s.name)) {
        return Err(format!("two scenarios are named `{}`", dup.name));
    }
    let mut runs: Vec<(&Scenario, Accel)> = Vec::new();
    for scenario in &all {
        if filter.is_some_and(|f| !scenario.name.contains(f)) {
            continue;
        }
        for &accel in accels.iter().filter(|a| scenario.accels.contains(a)) {
            runs.push((scenario, accel));
        }
    }

    if runs.is_empty() {
        return Err(format!(
            "no scenario matches --filter {:?} under {:?}",
            filter.unwrap_or_default(),
            accels
        ));
    }
    eprintln!("e2e: {} scenario runs on QEMU {version}", runs.len());
    // Built (or found up to date) before any scenario runs: no scenario's deadline pays for
    // compiling the CLI, whichever of them `--filter` leaves first.
    cli::binary()?;

    let run_dir = RunDir::create()?;
    let target = Target {
        binary: compat_wrapper(qemu, &run_dir.root)?,
        version: version.clone(),
    };
    let started = Instant::now();
    let before_run = Snapshot::take();
    let mut outcome = Outcome::default();
    for (index, (scenario, accel)) in runs.iter().enumerate() {
        run_one(&run_dir, index, scenario, *accel, &target, &mut outcome);
    }
    let run_leaks = run_dir.finish(&before_run);
    eprintln!(
        "e2e qemu {version}: {} passed, {} failed ({:.1} s)",
        outcome.passed,
        outcome.failed,
        started.elapsed().as_secs_f64()
    );
    if !run_leaks.is_empty() {
        eprintln!("e2e: the run leaked: {}", run_leaks.join("; "));
    }
    if outcome.failed == 0 && run_leaks.is_empty() {
        Ok(version)
    } else if outcome.failed == 0 {
        Err(format!(
            "QEMU {version}: the end-to-end run leaked resources"
        ))
    } else {
        Err(format!(
            "QEMU {version}: {} end-to-end scenarios failed",
            outcome.failed
        ))
    }
}

/// The QEMU the scenarios run: the binary (or the `-compat` wrapper around it) and its version.
struct Target {
    binary: PathBuf,
    version: String,
}

/// Every scenario runs QEMU with `-compat deprecated-input=reject,deprecated-output=hide` when
/// the binary has `-compat`, so the suite never depends on a deprecated command or argument:
/// a small script in the run directory puts it in front of the scenario's arguments.
fn compat_wrapper(qemu: &Path, run_dir: &Path) -> Result<PathBuf, String> {
    if !crate::qemu::has_compat(qemu)? {
        eprintln!(
            "e2e: {} has no -compat: deprecated commands are accepted",
            qemu.display()
        );
        return Ok(qemu.to_path_buf());
    }
    let qemu = std::path::absolute(qemu)
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| qemu.to_path_buf());
    let wrapper = run_dir.join("qemu-compat");
    crate::versions::write_wrapper(
        &wrapper,
        &format!(
            "#!/bin/sh\nexec {} -compat {} \"$@\"\n",
            crate::versions::shell_quote(qemu.as_os_str()),
            crate::qemu::COMPAT
        ),
    )?;
    eprintln!("e2e: QEMU runs with -compat {}", crate::qemu::COMPAT);
    Ok(wrapper)
}

/// Prints QEMU's version and accelerators; Ok carries the version number, Err says why a
/// requested accelerator cannot work.
fn report_qemu(qemu: &Path, accels: &[Accel]) -> Result<String, String> {
    let line = crate::qemu::version(qemu)?;
    eprintln!("e2e: {} ({line})", qemu.display());
    let built_in = crate::qemu::accelerators(qemu)?;
    let kvm = crate::qemu::probe_kvm(qemu);
    let kvm_text = match &kvm {
        Ok(took) => format!("usable (probe {} ms)", took.as_millis()),
        Err(why) => format!("unusable: {why}"),
    };
    eprintln!(
        "e2e: accelerators built in: {}; kvm {kvm_text}",
        built_in.join(", ")
    );
    if accels.contains(&Accel::Kvm) {
        if let Err(why) = kvm {
            return Err(format!("--accel kvm requested but KVM is unusable: {why}"));
        }
    }
    if accels.contains(&Accel::Tcg) && !built_in.iter().any(|a| a == "tcg") {
        return Err("--accel tcg requested but this QEMU has no TCG".to_string());
    }
    Ok(crate::qemu::version_number(&line).to_string())
}

/// Counts of the run.
#[derive(Default)]
struct Outcome {
    passed: usize,
    failed: usize,
}

/// How long a scenario that overran gets to wind down once its QEMUs are killed.
const WIND_DOWN: Duration = Duration::from_secs(5);
/// How long leak checks wait for resources that are being released to disappear.
const SETTLE: Duration = Duration::from_secs(2);

/// Runs one scenario under one accelerator and prints its result line and notes.
fn run_one(
    run_dir: &RunDir,
    index: usize,
    scenario: &Scenario,
    accel: Accel,
    target: &Target,
    outcome: &mut Outcome,
) {
    let label = format!(
        "{} [{}, qemu {}]",
        scenario.name,
        accel.as_str(),
        target.version
    );
    let scratch = run_dir.root.join(format!("{index:03}"));
    let report = match std::fs::create_dir(&scratch) {
        Ok(()) => execute(scenario, accel, target, &scratch, &run_dir.tmp, SETTLE),
        Err(e) => Report {
            failures: vec![format!("cannot create {}: {e}", scratch.display())],
            elapsed: Duration::ZERO,
            notes: Vec::new(),
        },
    };
    let ms = report.elapsed.as_secs_f64() * 1000.0;
    if report.failures.is_empty() {
        outcome.passed += 1;
        eprintln!("pass {label} {ms:.0} ms");
    } else {
        outcome.failed += 1;
        eprintln!("FAIL {label} {ms:.0} ms: {}", report.failures.join("; "));
    }
    for note in &report.notes {
        eprintln!("       {note}");
    }
}

/// What one run of a scenario gave.
struct Report {
    /// Empty when it passed: its own error, "timed out", leaks.
    failures: Vec<String>,
    /// Wall time of the scenario body.
    elapsed: Duration,
    /// What it recorded with [`Ctx::note`].
    notes: Vec<String>,
}

/// Runs `scenario` on its own thread with its deadline, then checks for leaks (waiting up to
/// `settle` for resources being released).
fn execute(
    scenario: &Scenario,
    accel: Accel,
    target: &Target,
    scratch: &Path,
    tmp: &Path,
    settle: Duration,
) -> Report {
    let notes = Arc::new(Mutex::new(Vec::new()));
    let mut failures: Vec<String> = Vec::new();
    let before = Snapshot::take();
    let started = Instant::now();
    let ctx = Ctx {
        qemu: target.binary.clone(),
        qemu_version: target.version.clone(),
        accel,
        deadline: started + scenario.timeout,
        scratch: scratch.to_path_buf(),
        notes: Arc::clone(&notes),
        spawned: Arc::new(Mutex::new(0)),
    };
    let body = scenario.run;
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("e2e {}", scenario.name))
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&ctx)));
            let result = result.unwrap_or_else(|panic| {
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".to_string());
                Err(format!("panicked: {text}"))
            });
            // The receiver is gone only if the harness itself went away.
            let _ = tx.send(result);
        });
    match spawned {
        Err(e) => failures.push(format!("cannot start a thread: {e}")),
        Ok(handle) => match rx.recv_timeout(scenario.timeout) {
            Ok(result) => {
                if let Err(why) = result {
                    failures.push(why);
                }
                // The body's panics were caught above; joining cannot fail.
                let _ = handle.join();
            }
            Err(_) => {
                failures.push(format!("timed out after {:?}", scenario.timeout));
                // Kill what it started so its blocking waits end; its guards reap them.
                let killed = kill_new_children(&before);
                if !killed.is_empty() {
                    failures.push(format!("killed its child processes {killed:?}"));
                }
                match rx.recv_timeout(WIND_DOWN) {
                    Ok(_) => {
                        let _ = handle.join();
                    }
                    Err(_) => failures.push(format!(
                        "its thread was still running {WIND_DOWN:?} after the kill"
                    )),
                }
            }
        },
    }
    let elapsed = started.elapsed();
    failures.extend(check_leaks(&before, scratch, tmp, settle));
    let notes = notes.lock().map(|n| n.clone()).unwrap_or_default();
    Report {
        failures,
        elapsed,
        notes,
    }
}

/// Waits (up to `settle`) for the process to be back to `before`, then reports what leaked
/// and cleans it up: children are killed and reaped, stray temp entries removed.
fn check_leaks(before: &Snapshot, scratch: &Path, tmp: &Path, settle: Duration) -> Vec<String> {
    let settle_until = Instant::now() + settle;
    loop {
        let now = Snapshot::take();
        let mut leaks = now.leaks_since(before);
        leaks.extend(scratch_leaks(scratch));
        leaks.extend(tmp_leaks(tmp));
        if leaks.is_empty() || Instant::now() >= settle_until {
            if !leaks.is_empty() {
                reap_new_children(before);
                clean_tmp(tmp);
            }
            return leaks.into_iter().map(|l| format!("leaked {l}")).collect();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sockets and directories under the scratch directory.
fn scratch_leaks(scratch: &Path) -> Vec<String> {
    let mut leaks = Vec::new();
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return vec![format!("scratch directory {} vanished", scratch.display())];
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            leaks.push(format!("directory {}", entry.path().display()));
        } else if kind.is_socket() {
            leaks.push(format!("socket {}", entry.path().display()));
        }
    }
    leaks
}

/// Anything in the run's private `$TMPDIR`.
fn tmp_leaks(tmp: &Path) -> Vec<String> {
    match std::fs::read_dir(tmp) {
        Ok(entries) => entries
            .flatten()
            .map(|e| format!("temp entry {}", e.path().display()))
            .collect(),
        Err(e) => vec![format!("private temp dir {}: {e}", tmp.display())],
    }
}

/// Empties the private `$TMPDIR` after a leak was reported, so the next scenario starts clean.
fn clean_tmp(tmp: &Path) {
    for entry in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = removed {
            log::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// SIGKILLs our children that were not there in `before`; returns their pids. Does not reap
/// them: their owners (the scenario's guards) do.
fn kill_new_children(before: &Snapshot) -> Vec<i32> {
    let mut killed = Vec::new();
    for (pid, _) in sys::children()
        .into_iter()
        .filter(|(pid, _)| !before.children.contains_key(pid))
    {
        sys::kill(pid);
        killed.push(pid);
    }
    killed
}

/// Kills and reaps our children that were not there in `before` (after a leak was reported:
/// nobody else owns them any more).
fn reap_new_children(before: &Snapshot) {
    for (pid, _) in sys::children()
        .into_iter()
        .filter(|(pid, _)| !before.children.contains_key(pid))
    {
        sys::kill(pid);
        sys::reap(pid);
    }
}

/// What the leak checks compare: our children and our open fds (also used by the fleet
/// benchmark's child process).
pub(crate) struct Snapshot {
    /// Child pid -> "comm (state)".
    children: BTreeMap<i32, String>,
    /// fd -> what it points to.
    fds: BTreeMap<i32, String>,
}

impl Snapshot {
    /// Our children and open fds now.
    pub(crate) fn take() -> Snapshot {
        Snapshot {
            children: sys::children(),
            fds: sys::open_fds(),
        }
    }

    /// Children and fds present now but not in `before` (and fds `before` had that are gone:
    /// someone closed an fd they did not own).
    pub(crate) fn leaks_since(&self, before: &Snapshot) -> Vec<String> {
        let mut leaks = Vec::new();
        for (pid, what) in &self.children {
            if !before.children.contains_key(pid) {
                leaks.push(format!("child process {pid} {what}"));
            }
        }
        for (fd, target) in &self.fds {
            if before.fds.get(fd) != Some(target) {
                leaks.push(format!("fd {fd} -> {target}"));
            }
        }
        for (fd, target) in &before.fds {
            if !self.fds.contains_key(fd) {
                leaks.push(format!("fd {fd} -> {target} was closed by someone else"));
            }
        }
        leaks
    }
}

/// The run's directory under the original `$TMPDIR`, and the private `$TMPDIR` inside it.
struct RunDir {
    root: PathBuf,
    tmp: PathBuf,
    original_tmp: Option<OsString>,
}

impl RunDir {
    /// Creates the run directory and points `$TMPDIR` at its private `tmp`. Called while the
    /// process has a single thread (before any scenario runs), so changing the environment is
    /// sound.
    fn create() -> Result<RunDir, String> {
        let root = tempfile::Builder::new()
            .prefix("qm-e2e-")
            .tempdir()
            .map_err(|e| format!("cannot create the run directory: {e}"))?
            .keep();
        let tmp = root.join("tmp");
        std::fs::create_dir(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let original_tmp = std::env::var_os("TMPDIR");
        std::env::set_var("TMPDIR", &tmp);
        eprintln!("e2e: scratch directory {}", root.display());
        Ok(RunDir {
            root,
            tmp,
            original_tmp,
        })
    }

    /// Checks the whole run for leaks against `before`, restores `$TMPDIR` and removes the run
    /// directory (unless `XTASK_E2E_KEEP` is set). Returns the leaks.
    fn finish(self, before: &Snapshot) -> Vec<String> {
        let mut leaks = Snapshot::take().leaks_since(before);
        leaks.extend(tmp_leaks(&self.tmp));
        match &self.original_tmp {
            Some(value) => std::env::set_var("TMPDIR", value),
            None => std::env::remove_var("TMPDIR"),
        }
        if std::env::var_os("XTASK_E2E_KEEP").is_some() {
            eprintln!("e2e: kept {}", self.root.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.root) {
            leaks.push(format!("cannot remove {}: {e}", self.root.display()));
        } else if self.root.exists() {
            leaks.push(format!("{} still exists", self.root.display()));
        }
        leaks
    }
}

/// The OS-level pieces: /proc scans, signals, and the fd mapping done between fork and exec.
mod sys {
    use std::collections::BTreeMap;
    use std::os::fd::RawFd;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use nix::sys::signal::Signal;
    use nix::sys::wait::WaitPidFlag;
    use nix::unistd::Pid;

    use super::{FIRST_CHILD_FD, MAX_PASSED_FDS};

    /// Our child processes (zombies included) from /proc: pid -> "comm (state)".
    pub(super) fn children() -> BTreeMap<i32, String> {
        let me = std::process::id().to_string();
        let mut found = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return found;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            // A process can exit between the listing and this read: skip it then.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let Some(close) = stat.rfind(')') else {
                continue;
            };
            let comm = stat
                .get(stat.find('(').map_or(0, |i| i + 1)..close)
                .unwrap_or("?");
            let mut rest = stat[close + 1..].split_whitespace();
            let state = rest.next().unwrap_or("?");
            if rest.next() == Some(me.as_str()) {
                found.insert(pid, format!("{comm} ({state})"));
            }
        }
        found
    }

    /// Our open fds from /proc/self/fd: fd -> link target. The directory handle used for the
    /// listing itself is left out.
    pub(super) fn open_fds() -> BTreeMap<i32, String> {
        let mut fds = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
            return fds;
        };
        for entry in entries.flatten() {
            let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Ok(target) = std::fs::read_link(entry.path()) {
                fds.insert(fd, target.display().to_string());
            }
        }
        // The listing's own fd shows up as a dangling link or not at all: it is open only
        // while read_dir runs. Drop entries that no longer exist.
        fds.retain(|fd, _| std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists());
        fds
    }

    /// SIGKILL, ignoring a process that is already gone.
    pub(super) fn kill(pid: i32) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }

    /// Reaps a child we killed, waiting at most about a second.
    pub(super) fn reap(pid: i32) {
        for _ in 0..1000 {
            match nix::sys::wait::waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                _ => return,
            }
        }
    }

    /// Arranges for `sources[i]` to be fd `FIRST_CHILD_FD + i` in the child, and for every
    /// other fd above stdio to be closed at exec, including ones we inherited without
    /// close-on-exec (cargo's jobserver pipe, for one): QEMU gets exactly what it was given.
    pub(super) fn map_fds_on_exec(cmd: &mut Command, sources: Vec<RawFd>) {
        // Above every target, so the first pass cannot overwrite a source still to be copied.
        const PARK_AT: libc::c_int = 64;
        let map = move || -> std::io::Result<()> {
            let mut parked = [0 as RawFd; MAX_PASSED_FDS];
            for (slot, &src) in parked.iter_mut().zip(&sources) {
                // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd open in this forked child; it only
                // allocates a new descriptor and is async-signal-safe.
                let fd = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, PARK_AT) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                *slot = fd;
            }
            let first_free = FIRST_CHILD_FD + sources.len() as RawFd;
            // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets the close-on-exec flag on
            // descriptors of this forked child (std's exec-error pipe is close-on-exec already);
            // a raw system call, async-signal-safe.
            let marked = unsafe {
                libc::syscall(
                    libc::SYS_close_range,
                    first_free as libc::c_uint,
                    libc::c_uint::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                )
            };
            if marked != 0 {
                // Kernels before 5.11: mark them one by one.
                for fd in first_free..4096 {
                    // SAFETY: F_SETFD on a number that may not be open: harmless (EBADF).
                    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                }
            }
            for (i, &fd) in parked.iter().take(sources.len()).enumerate() {
                let target = FIRST_CHILD_FD + i as RawFd;
                // SAFETY: dup2 onto a small fixed number in the forked child, async-signal-safe;
                // the new descriptor does not have FD_CLOEXEC, so QEMU inherits it.
                if unsafe { libc::dup2(fd, target) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: the closure only makes async-signal-safe system calls (fcntl, close_range,
        // dup2), reads captured data and allocates nothing, as required between fork and exec.
        unsafe {
            cmd.pre_exec(map);
        }
    }
}

/// `Ok` when `cond` holds, else a scenario failure saying `what`.
pub(super) fn check(cond: bool, what: impl Into<String>) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what.into())
    }
}

#[cfg(test)]
mod tests {
    //! The harness checks itself: deliberately broken scenarios must fail with the right
    //! reason. These look at process-wide state (children, fds), so they run as one test.

    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::sync::atomic::{AtomicI32, Ordering};

    use super::*;

    static LEAKED_FD: AtomicI32 = AtomicI32::new(-1);
    /// Serialises the tests of this module: each looks at the whole process's fds.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn scenario(
        name: &'static str,
        timeout_ms: u64,
        run: fn(&Ctx) -> Result<(), String>,
    ) -> Scenario {
        Scenario {
            name,
            accels: &[Accel::Tcg],
            timeout: Duration::from_millis(timeout_ms),
            run,
        }
    }

    fn execute_in(dir: &Path, index: usize, scenario: &Scenario, binary: &str) -> Report {
        let scratch = dir.join(format!("{index:03}"));
        std::fs::create_dir(&scratch).unwrap();
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let target = Target {
            binary: PathBuf::from(binary),
            version: "test".to_string(),
        };
        execute(
            scenario,
            Accel::Tcg,
            &target,
            &scratch,
            &tmp,
            Duration::from_millis(200),
        )
    }

    fn has(report: &Report, text: &str) -> bool {
        report.failures.iter().any(|f| f.contains(text))
    }

    #[test]
    fn harness_reports_failures_timeouts_and_leaks() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();

        let clean = execute_in(
            dir,
            0,
            &scenario("clean", 5000, |ctx| {
                ctx.note("measured");
                Ok(())
            }),
            "true",
        );
        assert!(clean.failures.is_empty(), "{:?}", clean.failures);
        assert_eq!(clean.notes, ["measured"]);

        let failing = execute_in(
            dir,
            1,
            &scenario("failing", 5000, |_| Err("nope".into())),
            "true",
        );
        assert_eq!(failing.failures, ["nope"]);

        let panicking = execute_in(
            dir,
            2,
            &scenario("panicking", 5000, |_| panic!("boom")),
            "true",
        );
        assert!(
            has(&panicking, "panicked: boom"),
            "{:?}",
            panicking.failures
        );

        // Overruns while blocked on its child: the harness kills the child, the guard reaps it.
        let started = Instant::now();
        let slow = execute_in(
            dir,
            3,
            &scenario("slow", 300, |ctx| {
                let mut child = ctx.qemu_command().arg("30").spawn()?;
                child
                    .wait_until(Instant::now() + Duration::from_secs(60))
                    .map(drop)
            }),
            "sleep",
        );
        assert!(has(&slow, "timed out after 300ms"), "{:?}", slow.failures);
        assert!(
            has(&slow, "killed its child processes"),
            "{:?}",
            slow.failures
        );
        assert!(!has(&slow, "leaked"), "{:?}", slow.failures);
        assert!(started.elapsed() < Duration::from_secs(10));

        // A child nobody reaps.
        let orphan = execute_in(
            dir,
            4,
            &scenario("orphan", 5000, |_| {
                let child = std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .map_err(|e| e.to_string())?;
                std::mem::forget(child);
                Ok(())
            }),
            "true",
        );
        assert!(
            has(&orphan, "leaked child process"),
            "{:?}",
            orphan.failures
        );
        assert!(has(&orphan, "sleep"), "{:?}", orphan.failures);
        // ... and the harness killed and reaped it.
        assert!(sys::children()
            .values()
            .all(|what| !what.starts_with("sleep")));

        // An fd nobody closes.
        let fd_leak = execute_in(
            dir,
            5,
            &scenario("fd", 5000, |_| {
                let file = File::open("/dev/null").map_err(|e| e.to_string())?;
                LEAKED_FD.store(file.into_raw_fd(), Ordering::SeqCst);
                Ok(())
            }),
            "true",
        );
        assert!(has(&fd_leak, "-> /dev/null"), "{:?}", fd_leak.failures);
        // SAFETY: the scenario above leaked this fd on purpose and nothing else owns it.
        drop(unsafe { OwnedFd::from_raw_fd(LEAKED_FD.load(Ordering::SeqCst)) });

        // A socket file left in the scratch directory.
        let socket = execute_in(
            dir,
            6,
            &scenario("socket", 5000, |ctx| {
                std::os::unix::net::UnixListener::bind(ctx.scratch.join("s.sock"))
                    .map_err(|e| e.to_string())?;
                Ok(())
            }),
            "true",
        );
        assert!(has(&socket, "leaked socket"), "{:?}", socket.failures);
    }

    #[test]
    fn pass_fd_hands_over_exactly_the_given_fds() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let ctx = Ctx {
            qemu: PathBuf::from("sh"),
            qemu_version: "test".to_string(),
            accel: Accel::Tcg,
            deadline: Instant::now() + Duration::from_secs(10),
            scratch: dir.path().to_path_buf(),
            notes: Arc::new(Mutex::new(Vec::new())),
            spawned: Arc::new(Mutex::new(0)),
        };
        let (mut ours_a, theirs_a) = socketpair().unwrap();
        let (mut ours_b, theirs_b) = socketpair().unwrap();
        let mut cmd = ctx.qemu_command();
        let a = cmd.pass_fd(theirs_a);
        let b = cmd.pass_fd(theirs_b);
        assert_eq!((a, b), (3, 4));
        // The child writes to each fd by number and lists its open fds.
        cmd.args(["-c", "echo A >&3; echo B >&4; exec ls /proc/self/fd"]);
        let mut child = cmd.spawn().unwrap();
        let status = child.wait_until(ctx.deadline).unwrap();
        assert!(status.success());
        let mut got = String::new();
        std::io::Read::read_to_string(&mut ours_a, &mut got).unwrap();
        assert_eq!(
            got, "A\n",
            "our copies were closed, so EOF came after QEMU exited"
        );
        got.clear();
        std::io::Read::read_to_string(&mut ours_b, &mut got).unwrap();
        assert_eq!(got, "B\n");
        let log = std::fs::read_to_string(dir.path().join("qemu-1.log")).unwrap();
        let fds: Vec<&str> = log.split_whitespace().collect();
        // 5 is the directory `ls` is reading.
        assert_eq!(
            fds,
            ["0", "1", "2", "3", "4", "5"],
            "only stdio and the passed fds"
        );
    }
}
