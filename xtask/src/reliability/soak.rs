//! Figure "launch/kill soak": N launch->quit and N launch->SIGKILL cycles of
//! `qemu-system-x86_64 -M none -accel tcg` through `machine_core::Machine`, then nothing left:
//! no QEMU, no zombie, no fd, no temp dir, and RSS growth under 5 MB.

use std::time::{Duration, Instant};

use machine_core::{EndedBy, Machine};
use serde_json::json;

use super::{chain, sys, Figure, Settings, Stats};

/// Cycles run before the baseline is taken: one-time allocations (thread stacks, the logger,
/// lazily built tables) are not growth.
const WARMUP: usize = 5;
/// Largest RSS growth allowed over the soak.
const RSS_LIMIT: u64 = 5 * 1000 * 1000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Quit,
    Kill,
}

struct Cycle {
    launch: Duration,
    end: Duration,
    total: Duration,
}

/// One cycle on a fresh machine: launch, a command, end it (quit or SIGKILL); checks the
/// report. The machine creates its private temp dir, so the dir's removal is exercised too.
fn cycle(settings: &Settings, end: End) -> Result<Cycle, String> {
    let t0 = Instant::now();
    let mut vm: Machine = settings.none_machine().build();
    vm.temp_dir().map_err(|e| chain(&e))?;
    vm.launch().map_err(|e| format!("launch: {}", chain(&e)))?;
    let launched = Instant::now();
    vm.cmd("query-status", ())
        .map_err(|e| format!("query-status: {}", chain(&e)))?;
    let t_end = Instant::now();
    let report = match end {
        End::Quit => vm.shutdown(),
        End::Kill => vm.kill(),
    }
    .map_err(|e| format!("end: {}", chain(&e)))?;
    let done = Instant::now();
    let expected = match end {
        End::Quit => report.ended_by == EndedBy::Quit && report.status.success(),
        End::Kill => {
            report.ended_by == EndedBy::Kill && report.status.signal() == Some(libc::SIGKILL)
        }
    };
    if !expected {
        return Err(format!(
            "unexpected end: {} ({})",
            report.ended_by, report.status
        ));
    }
    drop(vm);
    Ok(Cycle {
        launch: launched - t0,
        end: done - t_end,
        total: Instant::now() - t0,
    })
}

/// Runs the soak.
pub fn run(settings: &Settings) -> Figure {
    let mut figure = Figure::new("soak");
    let mut failures: Vec<String> = Vec::new();
    for i in 0..WARMUP {
        let end = if i % 2 == 0 { End::Quit } else { End::Kill };
        if let Err(e) = cycle(settings, end) {
            failures.push(format!("warm-up {i}: {e}"));
        }
    }
    sys::trim_heap();
    let before = sys::Snapshot::take();
    let rss_before = sys::rss_bytes();
    let temp_before = sys::temp_entries(&settings.temp_base()).len();

    let mut quit_cycles: Vec<Cycle> = Vec::new();
    let mut kill_cycles: Vec<Cycle> = Vec::new();
    let total = settings.cycles * 2;
    let started = Instant::now();
    for i in 0..total {
        // Alternate, so both kinds see the same conditions over the run.
        let end = if i % 2 == 0 { End::Quit } else { End::Kill };
        match cycle(settings, end) {
            Ok(c) if end == End::Quit => quit_cycles.push(c),
            Ok(c) => kill_cycles.push(c),
            Err(e) => failures.push(format!("cycle {i}: {e}")),
        }
        if (i + 1) % 200 == 0 {
            eprintln!(
                "  soak: {}/{total} cycles, {:.1} s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    sys::trim_heap();
    let rss_after = sys::rss_bytes();
    let after = sys::Snapshot::take();
    let (survivors, zombies) = after.new_children(&before);
    let fd_delta = after.fd_count() as i64 - before.fd_count() as i64;
    let temp_after = sys::temp_entries(&settings.temp_base()).len();
    let growth = rss_after as i64 - rss_before as i64;

    let n = settings.cycles;
    figure.check(
        format!("cycles completed ({n} quit + {n} SIGKILL)"),
        format!("{}", 2 * n),
        format!(
            "{} ({} failed)",
            quit_cycles.len() + kill_cycles.len(),
            failures.len()
        ),
        failures.is_empty(),
    );
    figure.check(
        "surviving qemu children",
        "0",
        survivors.to_string(),
        survivors == 0,
    );
    figure.check("zombies", "0", zombies.to_string(), zombies == 0);
    figure.check(
        "fd delta (/proc/self/fd)",
        "0",
        fd_delta.to_string(),
        fd_delta == 0,
    );
    figure.check(
        "temp-dir delta (private base)",
        "0",
        (temp_after as i64 - temp_before as i64).to_string(),
        temp_after == temp_before,
    );
    figure.check(
        "RSS growth (VmRSS after - before)",
        "< 5 MB",
        format!("{:.2} MB", growth as f64 / 1e6),
        growth < RSS_LIMIT as i64,
    );
    let quit_total = Stats::of(&quit_cycles.iter().map(|c| c.total).collect::<Vec<_>>());
    let kill_total = Stats::of(&kill_cycles.iter().map(|c| c.total).collect::<Vec<_>>());
    let quit_end = Stats::of(&quit_cycles.iter().map(|c| c.end).collect::<Vec<_>>());
    let kill_end = Stats::of(&kill_cycles.iter().map(|c| c.end).collect::<Vec<_>>());
    let launch = Stats::of(
        &quit_cycles
            .iter()
            .chain(&kill_cycles)
            .map(|c| c.launch)
            .collect::<Vec<_>>(),
    );
    figure.check(
        "launch->quit cycle time",
        "report",
        quit_total.to_string(),
        true,
    );
    figure.check(
        "launch->SIGKILL cycle time",
        "report",
        kill_total.to_string(),
        true,
    );
    figure.detail("launch", launch.to_json());
    figure.detail("quit_cycle", quit_total.to_json());
    figure.detail("kill_cycle", kill_total.to_json());
    figure.detail("quit_step", quit_end.to_json());
    figure.detail("kill_step", kill_end.to_json());
    figure.detail(
        "rss",
        json!({"before": rss_before, "after": rss_after, "growth": growth}),
    );
    figure.detail(
        "failures",
        json!(failures.iter().take(20).collect::<Vec<_>>()),
    );
    figure.note(format!(
        "launch (spawn to negotiated QMP) {launch}; quit step {quit_end}; kill step {kill_end}"
    ));
    for f in failures.iter().take(5) {
        figure.note(f.clone());
    }
    figure
}
