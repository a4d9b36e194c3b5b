//! `cargo xtask reliability`: measures the fault catalogue's section-3 figures against real
//! QEMU and the fake QMP server, prints them beside their targets, and fails on a miss.
//!
//! Each figure is a harness of its own (one submodule each) returning a [`Figure`]: a list of
//! checks, each with its target, the measured value and whether it passed. Every figure runs
//! under a deadline enforced by a watchdog thread, with a leak check around it (our children,
//! zombies included; our open fds; entries of the private base temp dir). The results are
//! printed as a table on stdout and, with `--json FILE`, written as JSON; the exit status is
//! non-zero when any check missed its target, so CI can gate on it.
//!
//! ```text
//! cargo xtask reliability [--quick] [--only soak,bad-launch,...] [--cycles N] [--chaos N]
//!                         [--console-runs R] [--seed N] [--json FILE]
//! ```

mod bad_launch;
mod chaos;
mod console;
mod fleet;
mod flood;
mod greeting;
mod mux;
mod security;

pub use security::connect_probe;
mod soak;
mod sys;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The figures, in the order they run, with the name `--only` takes.
pub const FIGURES: [&str; 11] = [
    "soak",
    "bad-launch",
    "greeting-timeout",
    "event-flood",
    "max-message",
    "chaos-kill",
    "fleet-chaos",
    "mux-chaos",
    "console-flood",
    "security",
    "self-check",
];

const USAGE: &str = "usage: cargo xtask reliability [--quick] [--only NAME,...] [--cycles N] \
[--chaos N] [--console-runs R] [--seed N] [--json FILE]\n  figures: soak, bad-launch, \
greeting-timeout, event-flood, max-message, chaos-kill, fleet-chaos, mux-chaos, console-flood, security";

/// What a run measures: sizes and repetitions of each figure.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Quick mode (CI): fewer cycles, no 30 s greeting timeout.
    pub quick: bool,
    /// Launch->quit and launch->SIGKILL cycles of the soak (each).
    pub cycles: usize,
    /// Iterations of the chaos kill.
    pub chaos: usize,
    /// Runs of the console flood.
    pub console_runs: usize,
    /// How long the guest floods its console before the shutdown, per run.
    pub flood_time: Duration,
    /// Runs of the event flood.
    pub event_flood_runs: usize,
    /// Greeting timeouts to measure, with the number of repetitions of each.
    pub greeting: Vec<(Duration, usize)>,
    /// Seed of the pseudo-random delays (printed, so a run can be repeated).
    pub seed: u64,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The private directory of this run (temp base, logs, sockets).
    pub dir: PathBuf,
}

impl Settings {
    /// The base temp dir handed to every machine: it must be empty after each figure.
    pub fn temp_base(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Scratch space for logs, sockets and odd-named files (not part of the temp-dir delta).
    pub fn scratch(&self) -> PathBuf {
        self.dir.join("scratch")
    }

    /// A builder for `qemu-system-x86_64 -M none -accel tcg -nodefaults` with our temp base.
    pub fn none_machine(&self) -> machine_core::MachineBuilder {
        let mut builder = machine_core::MachineBuilder::new(&self.qemu);
        builder
            .machine_type("none")
            .args(["-accel", "tcg", "-nodefaults"])
            .base_temp_dir(self.temp_base())
            .greeting_timeout(Duration::from_secs(10))
            .command_timeout(Duration::from_secs(10));
        builder
    }
}

/// One measured check: what, the target, what was measured, pass or miss.
#[derive(Debug, Clone)]
pub struct Check {
    /// What is measured.
    pub what: String,
    /// The target, as text.
    pub target: String,
    /// The measured value, as text.
    pub measured: String,
    /// Whether the target was met.
    pub pass: bool,
}

/// The result of one figure's harness.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Its name (as `--only` takes it).
    pub name: &'static str,
    /// The checks, in order.
    pub checks: Vec<Check>,
    /// Extra numbers for the JSON output (times, counts, distributions).
    pub details: serde_json::Map<String, Value>,
    /// Notes for the reader (what was feasible, what was substituted).
    pub notes: Vec<String>,
}

impl Figure {
    /// An empty figure called `name`.
    pub fn new(name: &'static str) -> Figure {
        Figure {
            name,
            checks: Vec::new(),
            details: serde_json::Map::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a check.
    pub fn check(
        &mut self,
        what: impl Into<String>,
        target: impl Into<String>,
        measured: impl Into<String>,
        pass: bool,
    ) {
        self.checks.push(Check {
            what: what.into(),
            target: target.into(),
            measured: measured.into(),
            pass,
        });
    }

    /// Adds a JSON detail.
    pub fn detail(&mut self, key: &str, value: Value) {
        self.details.insert(key.to_owned(), value);
    }

    /// Adds a note.
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// Whether every check passed (a figure without checks did not measure anything: a miss).
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.pass)
    }

    fn to_json(&self, elapsed: Duration) -> Value {
        json!({
            "name": self.name,
            "pass": self.passed(),
            "seconds": round3(elapsed.as_secs_f64()),
            "checks": self.checks.iter().map(|c| json!({
                "what": c.what, "target": c.target, "measured": c.measured, "pass": c.pass,
            })).collect::<Vec<_>>(),
            "details": Value::Object(self.details.clone()),
            "notes": self.notes,
        })
    }
}

/// Rounds to three decimals (milliseconds when the unit is seconds).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Median, p99 and max of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Number of values.
    pub n: usize,
    /// Median.
    pub median_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// Largest value.
    pub max_ms: f64,
}

impl Stats {
    /// Statistics of `samples`.
    pub fn of(samples: &[Duration]) -> Stats {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |q: f64| -> f64 {
            if ms.is_empty() {
                return 0.0;
            }
            let i = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1;
            ms[i]
        };
        Stats {
            n: ms.len(),
            median_ms: rank(0.5),
            p99_ms: rank(0.99),
            max_ms: ms.last().copied().unwrap_or(0.0),
        }
    }

    /// As JSON.
    pub fn to_json(self) -> Value {
        json!({"n": self.n, "median_ms": round3(self.median_ms), "p99_ms": round3(self.p99_ms),
            "max_ms": round3(self.max_ms)})
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "median {:.1} ms, p99 {:.1} ms, max {:.1} ms (n={})",
            self.median_ms, self.p99_ms, self.max_ms, self.n
        )
    }
}

/// A small deterministic pseudo-random generator (xorshift64*): random delays that a seed
/// reproduces, without a dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced: xorshift needs a non-zero state).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..bound` (bound > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }
}

/// The figure being run and its deadline, watched by the watchdog thread.
type Watched = Arc<Mutex<Option<(&'static str, Instant)>>>;

/// Parses the arguments, runs the selected figures and reports. `--serve-fake` (internal) runs
/// the fake QMP server process the event-flood and max-message figures talk to.
pub fn run(args: &[String]) -> Result<(), String> {
    if args.first().map(String::as_str) == Some(flood::SERVE_FLAG) {
        return flood::serve(&args[1..]);
    }
    let mut quick = false;
    let mut only: Option<Vec<String>> = None;
    let mut cycles: Option<usize> = None;
    let mut chaos: Option<usize> = None;
    let mut console_runs: Option<usize> = None;
    let mut seed: Option<u64> = None;
    let mut json_path: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        let number = |name: &str, text: String| {
            text.parse::<u64>()
                .map_err(|_| format!("{name}: not a number: {text}"))
        };
        match arg.as_str() {
            "--quick" => quick = true,
            "--only" => {
                let list: Vec<String> = value("--only")?
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                for name in &list {
                    if !FIGURES.contains(&name.as_str()) {
                        return Err(format!("unknown figure `{name}`\n{USAGE}"));
                    }
                }
                only = Some(list);
            }
            "--cycles" => cycles = Some(number("--cycles", value("--cycles")?)? as usize),
            "--chaos" => chaos = Some(number("--chaos", value("--chaos")?)? as usize),
            "--console-runs" => {
                console_runs = Some(number("--console-runs", value("--console-runs")?)? as usize)
            }
            "--seed" => seed = Some(number("--seed", value("--seed")?)?),
            "--json" => json_path = Some(PathBuf::from(value("--json")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    crate::qemu::ensure_installed()?;

    let root = tempfile::Builder::new()
        .prefix("qm-reliability-")
        .tempdir()
        .map_err(|e| format!("cannot create the run directory: {e}"))?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let settings = Settings {
        quick,
        cycles: cycles.unwrap_or(if quick { 100 } else { 1000 }),
        chaos: chaos.unwrap_or(if quick { 100 } else { 1000 }),
        console_runs: console_runs.unwrap_or(if quick { 3 } else { 20 }),
        flood_time: if quick {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(4)
        },
        event_flood_runs: if quick { 3 } else { 10 },
        greeting: if quick {
            vec![(Duration::from_secs(1), 3), (Duration::from_secs(5), 1)]
        } else {
            vec![
                (Duration::from_secs(1), 5),
                (Duration::from_secs(5), 3),
                (Duration::from_secs(30), 1),
            ]
        },
        seed,
        qemu: crate::qemu::binary(),
        dir: root.path().to_path_buf(),
    };
    for dir in [settings.temp_base(), settings.scratch()] {
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    eprintln!(
        "reliability: {} mode, seed {seed}, qemu {}, run dir {}",
        if quick { "quick" } else { "full" },
        crate::qemu::version(&crate::qemu::binary()).unwrap_or_else(|e| e),
        settings.dir.display()
    );

    let watched: Watched = Arc::new(Mutex::new(None));
    let watchdog_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = spawn_watchdog(Arc::clone(&watched), Arc::clone(&watchdog_stop))?;

    let selected: Vec<&'static str> = FIGURES
        .iter()
        .copied()
        .filter(|name| *name != "self-check")
        .filter(|name| only.as_ref().is_none_or(|o| o.iter().any(|n| n == name)))
        .collect();
    let process_before = sys::Snapshot::take();
    let started = Instant::now();
    let mut results: Vec<(Figure, Duration)> = Vec::new();
    for name in selected {
        let deadline = figure_deadline(name, &settings);
        eprintln!("reliability: {name} (deadline {deadline:?})");
        *watched.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((name, Instant::now() + deadline));
        let t0 = Instant::now();
        let before = sys::Snapshot::take();
        let mut figure = run_figure(name, &settings);
        let leaks = sys::settle_leaks(&before, &settings.temp_base(), Duration::from_secs(2));
        figure.check(
            "leaks after the figure (children, zombies, fds, temp entries)",
            "0",
            if leaks.is_empty() {
                "0".to_owned()
            } else {
                format!("{}: {}", leaks.len(), leaks.join("; "))
            },
            leaks.is_empty(),
        );
        let elapsed = t0.elapsed();
        *watched.lock().unwrap_or_else(PoisonError::into_inner) = None;
        eprintln!(
            "reliability: {name}: {} in {:.1} s",
            if figure.passed() { "pass" } else { "MISS" },
            elapsed.as_secs_f64()
        );
        results.push((figure, elapsed));
    }
    watchdog_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watchdog.join();

    // The harness itself: nothing left behind over the whole run.
    let mut self_check = Figure::new("self-check");
    let leaks = sys::settle_leaks(
        &process_before,
        &settings.temp_base(),
        Duration::from_secs(2),
    );
    self_check.check(
        "harness leaks over the whole run",
        "0",
        leaks.len().to_string(),
        leaks.is_empty(),
    );
    results.push((self_check, Duration::ZERO));

    let total = started.elapsed();
    print_table(&results, total);
    let all_pass = results.iter().all(|(f, _)| f.passed());
    if let Some(path) = &json_path {
        let doc = json!({
            "mode": if settings.quick { "quick" } else { "full" },
            "seed": seed,
            "qemu": crate::qemu::version(&crate::qemu::binary()).unwrap_or_default(),
            "pass": all_pass,
            "seconds": round3(total.as_secs_f64()),
            "settings": {
                "cycles": settings.cycles, "chaos": settings.chaos,
                "console_runs": settings.console_runs,
                "flood_seconds": settings.flood_time.as_secs_f64(),
                "event_flood_runs": settings.event_flood_runs,
            },
            "figures": results.iter().map(|(f, e)| f.to_json(*e)).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("reliability: wrote {}", path.display());
    }
    root.close()
        .map_err(|e| format!("cannot remove the run directory: {e}"))?;
    if all_pass {
        Ok(())
    } else {
        let missed: Vec<&str> = results
            .iter()
            .filter(|(f, _)| !f.passed())
            .map(|(f, _)| f.name)
            .collect();
        Err(format!("targets missed: {}", missed.join(", ")))
    }
}

/// Runs one figure, turning a panic into a failed check (a panic is a finding, not a crash of
/// the harness).
fn run_figure(name: &'static str, settings: &Settings) -> Figure {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match name {
        "soak" => soak::run(settings),
        "bad-launch" => bad_launch::run(settings),
        "greeting-timeout" => greeting::run(settings),
        "event-flood" => flood::run_event_flood(settings),
        "max-message" => flood::run_max_message(settings),
        "chaos-kill" => chaos::run(settings),
        "fleet-chaos" => fleet::run(settings),
        "mux-chaos" => mux::run(settings),
        "console-flood" => console::run(settings),
        "security" => security::run(settings),
        _ => Figure::new("unknown"),
    }));
    match result {
        Ok(figure) => figure,
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            let mut figure = Figure::new(name);
            figure.check("no panic", "0 panics", format!("panic: {text}"), false);
            figure
        }
    }
}

/// The wall-clock bound of each figure: past it the watchdog ends the process (QEMU children
/// die with it through their parent-death signal).
fn figure_deadline(name: &str, s: &Settings) -> Duration {
    let secs = match name {
        "soak" => 60 + s.cycles as u64 * 2 / 5,
        "bad-launch" => 120,
        "greeting-timeout" => {
            60 + s
                .greeting
                .iter()
                .map(|(t, n)| (t.as_secs() + 3) * *n as u64)
                .sum::<u64>()
        }
        "event-flood" => 60 + 20 * s.event_flood_runs as u64,
        "max-message" => 60,
        "chaos-kill" => 60 + s.chaos as u64 / 2,
        "fleet-chaos" => 120,
        "mux-chaos" => return mux::deadline(s),
        "console-flood" => 60 + (s.flood_time.as_secs() + 25) * s.console_runs as u64,
        "security" => 120,
        _ => 60,
    };
    Duration::from_secs(secs)
}

fn spawn_watchdog(
    watched: Watched,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name("reliability-watchdog".into())
        .spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let current = *watched.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some((name, deadline)) = current {
                    if Instant::now() > deadline {
                        eprintln!(
                            "reliability: figure {name} passed its deadline: a hang; aborting \
                             (QEMU children die with us through PR_SET_PDEATHSIG)"
                        );
                        let _ = std::io::stderr().flush();
                        std::process::exit(3);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .map_err(|e| format!("cannot start the watchdog: {e}"))
}

fn print_table(results: &[(Figure, Duration)], total: Duration) {
    let mut out = String::new();
    out.push_str("\nreliability figures (fault catalogue section 3)\n");
    for (figure, elapsed) in results {
        out.push_str(&format!(
            "\n== {} [{}] {:.1} s\n",
            figure.name,
            if figure.passed() { "PASS" } else { "MISS" },
            elapsed.as_secs_f64()
        ));
        let width = figure
            .checks
            .iter()
            .map(|c| c.what.len())
            .max()
            .unwrap_or(0)
            .min(60);
        for c in &figure.checks {
            out.push_str(&format!(
                "  {} {:width$}  target {:<18} measured {}\n",
                if c.pass { "ok  " } else { "MISS" },
                c.what,
                c.target,
                c.measured,
            ));
        }
        for note in &figure.notes {
            out.push_str(&format!("  note: {note}\n"));
        }
    }
    let passed = results.iter().filter(|(f, _)| f.passed()).count();
    out.push_str(&format!(
        "\n{passed}/{} figures met their targets in {:.1} s\n",
        results.len(),
        total.as_secs_f64()
    ));
    print!("{out}");
}

/// Removes every entry of `dir` (after a figure that leaked, so the next starts clean).
pub fn empty_dir(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let _ = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

/// Describes an error with its whole `source()` chain on one line.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_use_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Stats::of(&samples);
        assert_eq!(s.n, 100);
        assert_eq!(s.median_ms, 50.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        let one = Stats::of(&[Duration::from_millis(7)]);
        assert_eq!((one.median_ms, one.p99_ms, one.max_ms), (7.0, 7.0, 7.0));
        assert_eq!(Stats::of(&[]).n, 0);
    }

    #[test]
    fn rng_is_reproducible_and_bounded() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        let xs: Vec<u64> = (0..1000).map(|_| a.below(50_000)).collect();
        let ys: Vec<u64> = (0..1000).map(|_| b.below(50_000)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 50_000));
        // Spread over the window, not stuck in a corner.
        assert!(xs.iter().any(|x| *x < 10_000) && xs.iter().any(|x| *x > 40_000));
        assert_ne!(Rng::new(0).next_u64(), 0);
    }

    #[test]
    fn a_figure_without_checks_or_with_a_miss_fails() {
        let mut f = Figure::new("x");
        assert!(!f.passed());
        f.check("a", "0", "0", true);
        assert!(f.passed());
        f.check("b", "0", "1", false);
        assert!(!f.passed());
        assert_eq!(f.to_json(Duration::ZERO)["pass"], json!(false));
    }

    #[test]
    fn every_figure_has_a_deadline_longer_than_its_work() {
        let s = Settings {
            quick: false,
            cycles: 1000,
            chaos: 1000,
            console_runs: 20,
            flood_time: Duration::from_secs(4),
            event_flood_runs: 10,
            greeting: vec![(Duration::from_secs(30), 1)],
            seed: 1,
            qemu: PathBuf::from("qemu-system-x86_64"),
            dir: PathBuf::from("/nonexistent"),
        };
        assert!(figure_deadline("greeting-timeout", &s) > Duration::from_secs(33));
        assert!(figure_deadline("soak", &s) > Duration::from_secs(2000 / 10));
        for name in FIGURES {
            assert!(figure_deadline(name, &s) >= Duration::from_secs(60));
        }
    }
}
