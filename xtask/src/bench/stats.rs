//! What a benchmark measures (a figure: our side, a baseline from the same run, maybe the
//! Python anchor, a target) and how it is summarised: medians with min and max over rounds,
//! ratios and differences paired round by round, CPU time per operation.

use std::time::Duration;

use nix::sys::resource::{getrusage, UsageWho};

use super::sys::{cpu_time, Clock};
use serde_json::{json, Value};

/// CPU time: the total read from a precise clock, and its user and system parts from
/// `getrusage` (which splits by sampling, so the parts are used only as shares of the total).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// User plus system time, to the nanosecond.
    pub total: Duration,
    /// Time in user mode (`getrusage`).
    pub user: Duration,
    /// Time in the kernel on our behalf (`getrusage`).
    pub system: Duration,
}

impl Cpu {
    /// The calling thread's CPU time so far (for loops that run on one thread).
    pub fn thread() -> Cpu {
        Cpu::of(Clock::Thread, UsageWho::RUSAGE_THREAD)
    }

    /// The whole process's CPU time so far (for work spread over threads).
    pub fn process() -> Cpu {
        Cpu::of(Clock::Process, UsageWho::RUSAGE_SELF)
    }

    fn of(clock: Clock, who: UsageWho) -> Cpu {
        let tv = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(t.tv_sec().max(0) as u64)
                + Duration::from_micros(t.tv_usec().max(0) as u64)
        };
        let (user, system) = match getrusage(who) {
            Ok(usage) => (tv(usage.user_time()), tv(usage.system_time())),
            Err(e) => {
                log::warn!("getrusage: {e}");
                (Duration::ZERO, Duration::ZERO)
            }
        };
        Cpu {
            total: cpu_time(clock).unwrap_or(user + system),
            user,
            system,
        }
    }

    /// A reading from elsewhere (another process) with user and system time only.
    pub fn from_parts(user: Duration, system: Duration) -> Cpu {
        Cpu {
            total: user + system,
            user,
            system,
        }
    }

    /// Time since `earlier` (a reading of the same clock).
    pub fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            total: self.total.saturating_sub(earlier.total),
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }

    /// Per operation, in microseconds: (user, system), adding up to the precise total (split
    /// by `getrusage`'s shares; all user when it counted nothing).
    pub fn per_op_us(self, ops: usize) -> (f64, f64) {
        let n = ops.max(1) as f64;
        let total = self.total.as_secs_f64() * 1e6 / n;
        let sampled = (self.user + self.system).as_secs_f64();
        let user_share = if sampled > 0.0 {
            self.user.as_secs_f64() / sampled
        } else {
            1.0
        };
        (total * user_share, total * (1.0 - user_share))
    }
}

/// Runs `f` and returns its result, its wall time and the CPU time `clock` saw meanwhile.
pub fn measure<T>(clock: fn() -> Cpu, f: impl FnOnce() -> T) -> (T, Duration, Cpu) {
    let cpu = clock();
    let started = std::time::Instant::now();
    let out = f();
    let wall = started.elapsed();
    (out, wall, clock().since(cpu))
}

/// One side of a figure: its value in each round and its CPU time per operation in each
/// round (user, system; microseconds).
#[derive(Debug, Clone, Default)]
pub struct Side {
    /// What it is, e.g. `qmp_client::Connection` or `raw blocking socket`.
    pub name: String,
    /// The figure's value in each round, in the figure's unit.
    pub values: Vec<f64>,
    /// CPU time per operation in each round (user, system), microseconds.
    pub cpu_us: Vec<(f64, f64)>,
}

impl Side {
    /// An empty side called `name`.
    pub fn new(name: impl Into<String>) -> Side {
        Side {
            name: name.into(),
            ..Side::default()
        }
    }

    /// Records one round: its value, and the CPU time `cpu` spent on `ops` operations.
    pub fn push(&mut self, value: f64, cpu: Cpu, ops: usize) {
        self.values.push(value);
        self.cpu_us.push(cpu.per_op_us(ops));
    }

    /// Median, min and max of the values.
    pub fn spread(&self) -> Spread {
        Spread::of(&self.values)
    }

    /// CPU per operation, microseconds: (median of user + system, its user part, its system
    /// part). The split follows the user/system shares over all rounds, so the parts add up
    /// to the median (the kernel splits a thread's time between the two by sampling, which
    /// makes a single round's split coarse).
    pub fn cpu(&self) -> Option<(f64, f64, f64)> {
        if self.cpu_us.is_empty() {
            return None;
        }
        let total: Vec<f64> = self.cpu_us.iter().map(|(u, s)| u + s).collect();
        let median = Spread::of(&total).median;
        let user: f64 = self.cpu_us.iter().map(|c| c.0).sum();
        let all: f64 = total.iter().sum();
        let user_share = if all > 0.0 { user / all } else { 0.0 };
        Some((median, median * user_share, median * (1.0 - user_share)))
    }

    fn to_json(&self) -> Value {
        let spread = self.spread();
        let cpu = self.cpu();
        json!({
            "name": self.name,
            "median": spread.median, "min": spread.min, "max": spread.max,
            "values": self.values,
            "cpu_us_per_op": cpu.map(|(total, user, system)| json!({
                "total": total, "user": user, "system": system,
            })),
        })
    }
}

/// Median, min and max of a sample.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (NaN for none).
    pub fn of(values: &[f64]) -> Spread {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Spread {
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// What a figure must reach, judged on the median of its round-by-round ratios (ours over
/// the baseline) or differences (ours minus the baseline).
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// Ratio at least this (throughputs: ours / baseline).
    RatioAtLeast(f64),
    /// Ratio at most this (times: ours / baseline).
    RatioAtMost(f64),
    /// Difference at most this, in the figure's unit.
    DiffAtMost(f64),
    /// No target: the figure is shown for comparison (e.g. the slower way a user would do the
    /// same thing without the feature measured elsewhere in the table).
    Report,
}

impl Target {
    fn describe(self, unit: &str) -> String {
        match self {
            Target::RatioAtLeast(r) => format!(">= {r:.2}x"),
            Target::RatioAtMost(r) => format!("<= {r:.2}x"),
            Target::DiffAtMost(d) => format!("<= +{d} {unit}"),
            Target::Report => "none".to_string(),
        }
    }
}

/// A correctness condition measured alongside (events lost, bytes logged): unlike timings,
/// a failed check fails the task.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked, with the measured value.
    pub what: String,
    /// Whether it held.
    pub ok: bool,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Short stable name, e.g. `decode/schema`; `--filter` matches it.
    pub id: String,
    /// What is measured, for the table.
    pub name: String,
    /// The values' unit, e.g. `MB/s`, `us`, `ms`, `events/s`.
    pub unit: &'static str,
    /// Our side.
    pub ours: Side,
    /// The baseline measured in the same run, round by round with ours.
    pub baseline: Side,
    /// QEMU's Python client in the same rounds, where it applies.
    pub anchor: Option<Side>,
    /// What the figure must reach.
    pub target: Target,
    /// Correctness conditions measured alongside.
    pub checks: Vec<Check>,
    /// Remarks printed under the table.
    pub notes: Vec<String>,
}

impl Figure {
    /// A figure with empty sides.
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        unit: &'static str,
        ours: &str,
        baseline: &str,
        target: Target,
    ) -> Figure {
        Figure {
            id: id.into(),
            name: name.into(),
            unit,
            ours: Side::new(ours),
            baseline: Side::new(baseline),
            anchor: None,
            target,
            checks: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a correctness check.
    pub fn check(&mut self, what: impl Into<String>, ok: bool) {
        self.checks.push(Check {
            what: what.into(),
            ok,
        });
    }

    /// Ours over the baseline, round by round.
    pub fn ratios(&self) -> Vec<f64> {
        paired(&self.ours.values, &self.baseline.values, |a, b| a / b)
    }

    /// Ours minus the baseline, round by round.
    pub fn diffs(&self) -> Vec<f64> {
        paired(&self.ours.values, &self.baseline.values, |a, b| a - b)
    }

    /// Ours over the anchor, round by round.
    pub fn anchor_ratios(&self) -> Vec<f64> {
        match &self.anchor {
            Some(anchor) => paired(&self.ours.values, &anchor.values, |a, b| a / b),
            None => Vec::new(),
        }
    }

    /// Whether the median ratio (or difference) meets the target.
    pub fn met(&self) -> bool {
        match self.target {
            Target::RatioAtLeast(r) => Spread::of(&self.ratios()).median >= r,
            Target::RatioAtMost(r) => Spread::of(&self.ratios()).median <= r,
            Target::DiffAtMost(d) => Spread::of(&self.diffs()).median <= d,
            Target::Report => true,
        }
    }

    /// The target in words.
    pub fn target_text(&self) -> String {
        self.target.describe(self.unit)
    }

    /// As JSON, raw values included.
    pub fn to_json(&self) -> Value {
        let ratio = Spread::of(&self.ratios());
        let diff = Spread::of(&self.diffs());
        json!({
            "id": self.id,
            "name": self.name,
            "unit": self.unit,
            "ours": self.ours.to_json(),
            "baseline": self.baseline.to_json(),
            "anchor": self.anchor.as_ref().map(Side::to_json),
            "ratio": {"median": ratio.median, "min": ratio.min, "max": ratio.max},
            "difference": {"median": diff.median, "min": diff.min, "max": diff.max},
            "anchor_ratio": self.anchor.as_ref().map(|_| {
                let r = Spread::of(&self.anchor_ratios());
                json!({"median": r.median, "min": r.min, "max": r.max})
            }),
            "target": self.target_text(),
            "met": self.met(),
            "checks": self.checks.iter().map(|c| json!({"what": c.what, "ok": c.ok}))
                .collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }
}

fn paired(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_paired_ratios() {
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert!(Spread::of(&[]).median.is_nan());
        let mut figure = Figure::new("x", "x", "us", "a", "b", Target::RatioAtMost(1.1));
        // Round by round: 1.0, 2.0, 1.05; the median ratio is 1.05, not the ratio of medians.
        figure.ours.values = vec![100.0, 400.0, 105.0];
        figure.baseline.values = vec![100.0, 200.0, 100.0];
        assert_eq!(figure.ratios(), vec![1.0, 2.0, 1.05]);
        assert!(figure.met());
        figure.target = Target::RatioAtMost(1.0);
        assert!(!figure.met());
        figure.target = Target::DiffAtMost(5.0);
        assert!(figure.met());
        figure.target = Target::DiffAtMost(4.0);
        assert!(!figure.met());
    }
}
