//! Figure "console flood": the tiny guest floods its serial console while nobody reads it;
//! the shutdown must complete within 5 s (no deadlock), and every console byte produced up to
//! the exit, those written during the shutdown included, must be in the console log.

use std::time::{Duration, Instant};

use machine_core::console_socket::Pattern;
use machine_core::guest::{self, GuestMachine};
use machine_core::{EndedBy, MachineBuilder};
use serde_json::json;

use super::{chain, Figure, Settings, Stats};

/// Bytes the guest is asked for: far more than it can write in the time given, so it is still
/// flooding when the shutdown starts.
const FLOOD_REQUEST: u32 = 100_000_000;
/// The shutdown bound.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// The longest a run floods while waiting for enough bytes.
const FLOOD_LIMIT: Duration = Duration::from_secs(20);

/// The default socket send buffer (what a unix socket holds unread, about).
fn socket_buffer() -> usize {
    std::fs::read_to_string("/proc/sys/net/core/wmem_default")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(212_992)
}

struct Run {
    shutdown: Duration,
    flood_bytes: usize,
    during_shutdown: u64,
    log_matches: bool,
    pattern_ok: bool,
    ended_by_quit: bool,
    rate: f64,
}

fn one(settings: &Settings, kernel: &std::path::Path, index: usize) -> Result<Run, String> {
    let log = settings.scratch().join(format!("console-{index}.log"));
    let mut builder = MachineBuilder::new(&settings.qemu);
    builder
        .args(guest::qemu_args(kernel, GuestMachine::Q35))
        .args(["-accel", "tcg", "-nodefaults"])
        .base_temp_dir(settings.temp_base())
        .greeting_timeout(Duration::from_secs(10))
        .command_timeout(Duration::from_secs(10))
        .console_log(&log);
    let mut vm = builder.build();
    vm.launch().map_err(|e| format!("launch: {}", chain(&e)))?;
    let console = vm.console().map_err(|e| chain(&e))?;
    console
        .wait_for(&Pattern::substring(guest::PROMPT), Duration::from_secs(10))
        .map_err(|e| format!("waiting for the prompt: {}", chain(&e)))?;
    let command = guest::Command::Flood(FLOOD_REQUEST).to_string();
    console
        .send_line(&command)
        .map_err(|e| format!("sending {command}: {}", chain(&e)))?;
    let flood_start = Instant::now();
    // The point of the figure: nobody reads the console while the guest floods it. It floods
    // for the configured time and at least until twice the socket buffer went through (a
    // slow, loaded host), within FLOOD_LIMIT; only the byte counter is looked at meanwhile.
    let until = flood_start + settings.flood_time;
    let limit = flood_start + FLOOD_LIMIT;
    let floor = 2 * socket_buffer() as u64;
    loop {
        let now = Instant::now();
        let total = vm.console().map_err(|e| chain(&e))?.bytes_total();
        if now >= limit || (now >= until && total > floor + 1024) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let before_shutdown = vm.console().map_err(|e| chain(&e))?.bytes_total();
    let flood_elapsed = flood_start.elapsed();
    let t0 = Instant::now();
    let report = vm.shutdown();
    let shutdown = t0.elapsed();
    let ended_by_quit = matches!(&report, Ok(r) if r.ended_by == EndedBy::Quit);
    if let Err(e) = &report {
        return Err(format!("shutdown: {}", chain(e)));
    }
    let console = vm.console().map_err(|e| chain(&e))?;
    let total = console.bytes_total();
    drop(vm);
    let text = std::fs::read(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let _ = std::fs::remove_file(&log);
    let marker = format!("{command}\r\n");
    let start = text
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
        .map(|p| p + marker.len())
        .ok_or("the echo of the flood command is not in the log")?;
    let flood = &text[start..];
    let pattern_ok = flood
        .iter()
        .enumerate()
        .all(|(i, b)| *b == guest::FLOOD_PATTERN[i % guest::FLOOD_PATTERN.len()]);
    Ok(Run {
        shutdown,
        flood_bytes: flood.len(),
        during_shutdown: total.saturating_sub(before_shutdown),
        log_matches: text.len() as u64 == total,
        pattern_ok,
        ended_by_quit,
        rate: before_shutdown as f64 / flood_elapsed.as_secs_f64(),
    })
}

/// Runs the figure.
pub fn run(settings: &Settings) -> Figure {
    let mut figure = Figure::new("console-flood");
    let kernel = match guest::write_kernel(&settings.scratch()) {
        Ok(k) => k,
        Err(e) => {
            figure.check("tiny guest kernel written", "ok", e.to_string(), false);
            return figure;
        }
    };
    let mut runs: Vec<Run> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for i in 0..settings.console_runs {
        match one(settings, &kernel, i) {
            Ok(r) => {
                eprintln!(
                    "  console flood {i}: {} KB unread, shutdown {:.0} ms",
                    r.flood_bytes / 1000,
                    r.shutdown.as_secs_f64() * 1e3
                );
                runs.push(r);
            }
            Err(e) => errors.push(format!("run {i}: {e}")),
        }
    }
    let _ = std::fs::remove_file(&kernel);
    let n = settings.console_runs;
    let stats = Stats::of(&runs.iter().map(|r| r.shutdown).collect::<Vec<_>>());
    let deadlocks = runs.iter().filter(|r| r.shutdown >= SHUTDOWN_LIMIT).count() + errors.len();
    let logged = runs
        .iter()
        .filter(|r| r.log_matches && r.pattern_ok)
        .count();
    let quit = runs.iter().filter(|r| r.ended_by_quit).count();
    let min_flood = runs.iter().map(|r| r.flood_bytes).min().unwrap_or(0);
    let mean_rate = runs.iter().map(|r| r.rate).sum::<f64>() / runs.len().max(1) as f64;
    let during: u64 = runs.iter().map(|r| r.during_shutdown).sum();
    figure.check(
        format!(
            "runs (guest floods {:.0} s unread, then shutdown)",
            settings.flood_time.as_secs_f64()
        ),
        format!("{n}/{n}"),
        format!("{}/{n}", runs.len()),
        runs.len() == n,
    );
    figure.check(
        "shutdown time",
        "< 5 s each",
        stats.to_string(),
        runs.len() == n && stats.max_ms < SHUTDOWN_LIMIT.as_secs_f64() * 1e3,
    );
    figure.check(
        "deadlocks",
        format!("0 in {n} runs"),
        deadlocks.to_string(),
        deadlocks == 0,
    );
    figure.check(
        "ended by our quit (not a kill)",
        format!("{n}/{n}"),
        format!("{quit}/{n}"),
        quit == n,
    );
    figure.check(
        "console log = every byte drained, flood intact",
        format!("{n}/{n}"),
        format!("{logged}/{n}"),
        logged == n,
    );
    let sndbuf = socket_buffer();
    figure.check(
        "unread flood per run",
        format!("> 2 x socket buffer ({} KB)", 2 * sndbuf / 1000),
        format!(
            "min {:.2} MB at {:.0} KB/s",
            min_flood as f64 / 1e6,
            mean_rate / 1e3
        ),
        min_flood > 2 * sndbuf,
    );
    figure.detail("shutdown", stats.to_json());
    figure.detail(
        "runs",
        json!(runs
            .iter()
            .map(|r| json!({"flood_bytes": r.flood_bytes, "shutdown_ms":
                super::round3(r.shutdown.as_secs_f64() * 1e3),
                "bytes_during_shutdown": r.during_shutdown, "rate_bytes_per_s": r.rate.round()}))
            .collect::<Vec<_>>()),
    );
    figure.detail("errors", json!(errors));
    figure.note(format!(
        "100 MB is not feasible under TCG (~{:.0} KB/s); each run floods >= {:.0} s unread ({:.2} MB min); \
         {during} bytes were drained during the shutdowns and kept",
        mean_rate / 1e3,
        settings.flood_time.as_secs_f64(),
        min_flood as f64 / 1e6
    ));
    for e in errors.iter().take(3) {
        figure.note(e.clone());
    }
    figure
}
