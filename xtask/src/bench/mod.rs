//! `cargo xtask bench [--quick] [--filter TEXT] [--json FILE]`: every benchmark in one table,
//! each figure beside a baseline measured in the same run and, for QMP, beside QEMU's Python
//! client `qemu.qmp`.
//!
//! Each row is a [`Figure`]: our value and the baseline's over several rounds that alternate
//! between the two (so load from other processes hits both alike), shown as median [min-max];
//! the ratio is computed round by round and its median compared with the target. Beside every
//! wall-clock figure stands the CPU time (user + system) our process spent per operation,
//! which other processes on a shared machine disturb least.
//!
//! The full run builds and runs this task in release mode (`cargo run --release -p xtask`);
//! `--quick` runs short versions in the current build, so that `cargo xtask ci` keeps every
//! benchmark working without judging timings (CI machines are shared and noisy). Correctness
//! conditions measured alongside (0 events lost, every byte logged) fail the task in both.
//!
//! Adding a figure: write a module with a `run(&Settings) -> Result<Vec<Figure>, String>` and
//! list it in [`GROUPS`]. Figures still being built elsewhere are listed in [`PLANNED`] and
//! printed under the table until their group lands.

mod agent;
mod decode;
mod drain;
mod fleet;
mod lifecycle;
mod mux;
pub(crate) mod python;
mod qmp;
mod qtest;
mod stats;
mod sys;

use std::path::PathBuf;

use serde_json::json;

pub use stats::{measure, Cpu, Figure, Spread, Target};

const USAGE: &str = "usage: cargo xtask bench [--quick] [--filter TEXT] [--json FILE]";

/// The flag of the release-mode child run (`cargo xtask bench` re-runs itself with it).
const HERE_FLAG: &str = "--in-this-build";

/// What a group of figures needs to know about the run.
pub struct Settings {
    /// Short runs (CI): everything works, timings mean little.
    pub quick: bool,
    /// Only figures whose id or name contains this.
    pub filter: Option<String>,
    /// Scratch space for the run (logs, the Python venv's anchor script).
    pub scratch: PathBuf,
}

impl Settings {
    /// Whether the figure `id` (named `name`) is selected by `--filter`.
    pub fn wants(&self, id: &str, name: &str) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|f| id.contains(f) || name.contains(f))
    }

    /// `full` in a full run, `quick` with `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

/// A group of figures measured together (they share a QEMU, a corpus or a loop).
struct Group {
    /// The ids of its figures start with this (`decode/...`), for error messages.
    prefix: &'static str,
    run: fn(&Settings) -> Result<Vec<Figure>, String>,
}

/// Every group, in the order they run. Extension point for the figures being added now:
/// the fleet (`fleet/...`: N machines from one thread beside the raw one-thread fleet floor),
/// the QMP multiplexer (`mux/...`) and the guest agent (`agent/...`) each add a module and a
/// line here, and drop their entry from [`PLANNED`].
const GROUPS: &[Group] = &[
    Group {
        prefix: "decode",
        run: decode::run,
    },
    Group {
        prefix: "qmp",
        run: qmp::run,
    },
    Group {
        prefix: "lifecycle",
        run: lifecycle::run,
    },
    Group {
        prefix: "console",
        run: drain::run,
    },
    Group {
        prefix: "qtest",
        run: qtest::run,
    },
    Group {
        prefix: "mux",
        run: mux::run,
    },
    Group {
        prefix: "fleet",
        run: fleet::run,
    },
    Group {
        prefix: "agent",
        run: agent::run,
    },
];

/// Figures that other work is adding (id prefix, what it will measure, its baseline).
const PLANNED: &[(&str, &str)] = &[];

/// Runs the task.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut quick = false;
    let mut here = false;
    let mut filter = None;
    let mut json_path = None;
    if args.first().map(String::as_str) == Some(fleet::CHILD_FLAG) {
        // One side of one round of the fleet figures, in a process of its own.
        return fleet::child(&args[1..]);
    }
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            HERE_FLAG => here = true,
            "--filter" => filter = Some(it.next().ok_or("--filter needs a value")?.clone()),
            "--json" => json_path = Some(PathBuf::from(it.next().ok_or("--json needs a value")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    crate::qemu::ensure_installed()?;
    if !quick && !here {
        // Timings of a debug build mean little: measure in release mode.
        let mut child: Vec<&str> = vec!["run", "--release", "--quiet", "-p", "xtask", "--"];
        child.extend(["bench", HERE_FLAG]);
        child.extend(args.iter().map(String::as_str));
        return crate::cargo(&child, &[]);
    }

    let scratch = tempfile::Builder::new()
        .prefix("qm-bench-")
        .tempdir()
        .map_err(|e| format!("cannot create the scratch directory: {e}"))?;
    let settings = Settings {
        quick,
        filter,
        scratch: scratch.path().to_path_buf(),
    };
    let mut figures = Vec::new();
    for group in GROUPS {
        // Each group skips the figures `--filter` leaves out, and returns none if it is left out.
        let mut got = (group.run)(&settings).map_err(|e| format!("{}: {e}", group.prefix))?;
        figures.append(&mut got);
    }
    if figures.is_empty() {
        return Err(format!(
            "no figure matches --filter {:?}",
            settings.filter.unwrap_or_default()
        ));
    }

    let header = Header::now(quick);
    print!("{}", render(&header, &figures));
    if let Some(path) = json_path {
        let doc = json!({
            "date": header.date,
            "qemu": header.qemu,
            "accelerator": "tcg",
            "load": header.load,
            "command": header.command,
            "quick": quick,
            "figures": figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
            "planned": PLANNED.iter().map(|(id, what)| json!({"id": id, "what": what}))
                .collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(&path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("xtask bench: wrote {}", path.display());
    }
    let failed: Vec<String> = figures
        .iter()
        .flat_map(|f| f.checks.iter().filter(|c| !c.ok).map(move |c| (f, c)))
        .map(|(f, c)| format!("{}: {}", f.id, c.what))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("checks failed: {}", failed.join("; ")))
    }
}

/// Where and how the table was measured.
struct Header {
    date: String,
    qemu: String,
    command: String,
    quick: bool,
    /// The 1-minute load average when the table was printed, and the CPU count: on a shared
    /// machine this says how much the wall-clock figures were disturbed.
    load: String,
}

impl Header {
    fn now(quick: bool) -> Header {
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let mut command = String::from("cargo xtask bench");
        let args: Vec<String> = std::env::args()
            .skip(2)
            .filter(|a| a != HERE_FLAG)
            .collect();
        for arg in args {
            command.push(' ');
            command.push_str(&arg);
        }
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|text| text.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "?".to_string());
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        Header {
            date,
            qemu: crate::qemu::version(&crate::qemu::binary()).unwrap_or_else(|e| e.to_string()),
            command,
            quick,
            load: format!("load average {load} on {cpus} CPUs"),
        }
    }
}

/// The table (Markdown, so that BENCHMARKS.md can hold it as printed) and the notes under it.
fn render(header: &Header, figures: &[Figure]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "\n`{}` on {}, {}, accelerator tcg, {}{}\n\n",
        header.command,
        header.date,
        header.qemu,
        header.load,
        if header.quick {
            " (quick run: timings not judged)"
        } else {
            ""
        }
    ));
    out.push_str(
        "| figure | ours: median [min-max] | baseline, same run | ratio (paired) | target | met | our CPU/op (user+sys) | baseline CPU/op | qemu.qmp (Python), same run |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for f in figures {
        let ours = f.ours.spread();
        let base = f.baseline.spread();
        let ratio = Spread::of(&f.ratios());
        let compared = match f.target {
            Target::DiffAtMost(_) => {
                let d = Spread::of(&f.diffs());
                format!("{:+.3} {} [{:+.3}..{:+.3}]", d.median, f.unit, d.min, d.max)
            }
            _ => format!("{:.2}x [{:.2}-{:.2}]", ratio.median, ratio.min, ratio.max),
        };
        let anchor = match &f.anchor {
            Some(side) => {
                let s = side.spread();
                let r = Spread::of(&f.anchor_ratios());
                format!(
                    "{} {}, CPU {}; ours/it {:.2}x",
                    value(s.median, f.unit),
                    f.unit,
                    cpu_text(side),
                    r.median
                )
            }
            None => "-".to_string(),
        };
        let met = match f.target {
            Target::Report => "-",
            _ if f.met() => "yes",
            _ => "**no**",
        };
        out.push_str(&format!(
            "| {} | {} [{}-{}] {} | {}: {} {} | {} | {} | {} | {} | {} | {} |\n",
            f.name,
            value(ours.median, f.unit),
            value(ours.min, f.unit),
            value(ours.max, f.unit),
            f.unit,
            f.baseline.name,
            value(base.median, f.unit),
            f.unit,
            compared,
            f.target_text(),
            met,
            cpu_text(&f.ours),
            cpu_text(&f.baseline),
            anchor,
        ));
    }
    out.push('\n');
    for f in figures {
        for check in &f.checks {
            let verdict = if check.ok { "ok" } else { "FAILED" };
            out.push_str(&format!("- {}: {} {verdict}\n", f.name, check.what));
        }
        for note in &f.notes {
            out.push_str(&format!("- {}: {note}\n", f.name));
        }
    }
    for (id, what) in PLANNED {
        out.push_str(&format!("- not measured yet (`{id}/...`): {what}\n"));
    }
    out
}

/// A value with as many decimals as its unit needs.
fn value(v: f64, unit: &str) -> String {
    match unit {
        "us" => format!("{v:.1}"),
        "ms" => format!("{v:.2}"),
        _ if v >= 100.0 => format!("{v:.0}"),
        _ => format!("{v:.1}"),
    }
}

/// Median CPU per operation: `total us (user u + system s)`.
fn cpu_text(side: &stats::Side) -> String {
    match side.cpu() {
        Some((total, user, system)) => {
            format!(
                "{} ({} u + {} s)",
                micros(total),
                micros(user),
                micros(system)
            )
        }
        None => "-".to_string(),
    }
}

/// Microseconds, switching to milliseconds from 10 ms.
fn micros(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.1} us")
    }
}
