//! Figure "chaos kill": QEMU is SIGKILLed at a random point (0-50 ms) while a script of QMP
//! commands runs through `Machine`; every command must end in a result or a typed error,
//! no iteration may pass its deadline, and nothing may leak.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use machine_core::{qmp_client, Error, Machine};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use super::{chain, sys, Figure, Rng, Settings, Stats};

/// The kill lands uniformly in `0..KILL_WINDOW` after the script starts.
const KILL_WINDOW_MS: u64 = 50;
/// The script keeps issuing commands until it sees the kill, for at most this long (far past
/// the window, so a killer thread delayed by a loaded machine still lands mid-script).
const SCRIPT_TIME: Duration = Duration::from_secs(3);
/// Deadline of each command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of a whole iteration (launch, script, end).
const ITERATION_DEADLINE: Duration = Duration::from_secs(5);
/// After the first failure, the next command must fail within this (sticky error).
const FAST_FAIL: Duration = Duration::from_millis(100);

/// The script, cycled: cheap and expensive replies, state changes with their events.
fn script_step(i: usize) -> (&'static str, Value) {
    match i % 8 {
        0 => ("query-status", json!({})),
        1 => ("stop", json!({})),
        2 => ("query-commands", json!({})),
        3 => ("cont", json!({})),
        4 => ("qom-list", json!({"path": "/machine"})),
        5 => (
            "human-monitor-command",
            json!({"command-line": "info status"}),
        ),
        6 => ("query-version", json!({})),
        _ => ("query-qmp-schema", json!({})),
    }
}

/// How a command ended.
fn classify(result: &Result<Value, Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(Error::Command { .. }) => "qmp error reply",
        Err(Error::Qmp { source, .. }) => match source {
            qmp_client::Error::Disconnected { .. } => "Disconnected",
            qmp_client::Error::Eof { .. } => "Eof",
            qmp_client::Error::Io { .. } => "Io",
            qmp_client::Error::Closed => "Closed",
            qmp_client::Error::CommandTimeout { .. } => "CommandTimeout (hang)",
            _ => "other qmp error",
        },
        Err(Error::NotRunning) => "NotRunning",
        Err(_) => "other error",
    }
}

/// Kinds that count as a correct outcome after a kill.
fn expected(kind: &str) -> bool {
    matches!(
        kind,
        "ok" | "qmp error reply" | "Disconnected" | "Eof" | "Io" | "Closed" | "NotRunning"
    )
}

struct Iteration {
    total: Duration,
    kinds: Vec<&'static str>,
    sticky_ok: bool,
    saw_failure: bool,
    end: String,
    end_ok: bool,
    detail: Option<String>,
}

fn iteration(settings: &Settings, delay: Duration) -> Result<Iteration, String> {
    let t0 = Instant::now();
    let mut builder = settings.none_machine();
    builder.command_timeout(COMMAND_TIMEOUT);
    let mut vm: Machine = builder.build();
    vm.launch().map_err(|e| format!("launch: {}", chain(&e)))?;
    let pid = vm.pid().ok_or("no pid after launch")?;
    let mut kinds: Vec<&'static str> = Vec::new();
    let mut sticky_ok = true;
    let mut saw_failure = false;
    let mut detail = None;
    std::thread::scope(|scope| -> Result<(), String> {
        // Joined before the machine reaps QEMU, so the pid cannot have been reused.
        let killer = scope.spawn(move || {
            std::thread::sleep(delay);
            sys::signal(pid, Signal::SIGKILL)
        });
        let script_start = Instant::now();
        let mut i = 0usize;
        while script_start.elapsed() < SCRIPT_TIME {
            let (command, args) = script_step(i);
            i += 1;
            let result = vm.cmd_with_timeout(command, args, COMMAND_TIMEOUT);
            let kind = classify(&result);
            kinds.push(kind);
            if !expected(kind) && detail.is_none() {
                detail = result.as_ref().err().map(|e| chain(e));
            }
            if result.is_err() && kind != "qmp error reply" {
                saw_failure = true;
                // The error is sticky: the next call fails at once.
                let t = Instant::now();
                let again = vm.cmd_with_timeout("query-status", json!({}), COMMAND_TIMEOUT);
                let again_kind = classify(&again);
                kinds.push(again_kind);
                sticky_ok = again.is_err() && t.elapsed() < FAST_FAIL;
                break;
            }
        }
        killer
            .join()
            .map_err(|_| "the killer thread panicked".to_owned())?
    })?;
    let (end, end_ok) = match vm.shutdown() {
        Ok(report) => (
            format!("report: {}", report.ended_by),
            report.status.signal() == Some(libc::SIGKILL),
        ),
        Err(Error::AbnormalShutdown { report, .. }) => (
            format!("abnormal shutdown: {}", report.ended_by),
            report.status.signal() == Some(libc::SIGKILL),
        ),
        Err(e) => (format!("shutdown error: {}", chain(&e)), false),
    };
    drop(vm);
    Ok(Iteration {
        total: t0.elapsed(),
        kinds,
        sticky_ok,
        saw_failure,
        end,
        end_ok,
        detail,
    })
}

/// Runs the figure.
pub fn run(settings: &Settings) -> Figure {
    let mut figure = Figure::new("chaos-kill");
    let mut rng = Rng::new(settings.seed);
    let mut iterations: Vec<Iteration> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let started = Instant::now();
    for i in 0..settings.chaos {
        let delay = Duration::from_micros(rng.below(KILL_WINDOW_MS * 1000));
        match iteration(settings, delay) {
            Ok(it) => iterations.push(it),
            Err(e) => errors.push(format!("iteration {i}: {e}")),
        }
        if (i + 1) % 100 == 0 {
            eprintln!(
                "  chaos: {}/{} iterations, {:.1} s",
                i + 1,
                settings.chaos,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let n = settings.chaos;
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for it in &iterations {
        for k in &it.kinds {
            *kinds.entry(k).or_default() += 1;
        }
    }
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    for it in &iterations {
        *ends.entry(it.end.clone()).or_default() += 1;
    }
    let commands: usize = kinds.values().sum();
    let typed: usize = kinds
        .iter()
        .filter(|(k, _)| expected(k))
        .map(|(_, n)| n)
        .sum();
    let hangs = iterations
        .iter()
        .filter(|it| it.total > ITERATION_DEADLINE || it.kinds.contains(&"CommandTimeout (hang)"))
        .count();
    let observed = iterations.iter().filter(|it| it.saw_failure).count();
    let sticky = iterations
        .iter()
        .filter(|it| it.saw_failure && it.sticky_ok)
        .count();
    let ended = iterations.iter().filter(|it| it.end_ok).count();
    let stats = Stats::of(&iterations.iter().map(|it| it.total).collect::<Vec<_>>());
    figure.check(
        "iterations run",
        format!("{n}"),
        format!("{} ({} setup errors)", iterations.len(), errors.len()),
        iterations.len() == n,
    );
    figure.check(
        "commands ending in a result or a typed error",
        "100 %",
        format!(
            "{:.2} % ({typed}/{commands})",
            100.0 * typed as f64 / commands.max(1) as f64
        ),
        typed == commands && commands > 0,
    );
    figure.check(
        "hangs (iteration > 5 s or a command timeout)",
        "0",
        hangs.to_string(),
        hangs == 0,
    );
    figure.check(
        "kill seen by the script, then fail-fast (< 100 ms)",
        format!("{n}/{n}"),
        format!("{observed} seen, {sticky} fail-fast"),
        observed == n && sticky == n,
    );
    figure.check(
        "shutdown afterwards reports SIGKILL",
        format!("{n}/{n}"),
        format!("{ended}/{n}"),
        ended == n,
    );
    figure.check(
        "iteration time",
        "< 5 s each",
        stats.to_string(),
        stats.max_ms < 5000.0,
    );
    figure.detail("outcomes", json!(kinds));
    figure.detail("ends", json!(ends));
    figure.detail("iteration", stats.to_json());
    figure.detail("errors", json!(errors.iter().take(20).collect::<Vec<_>>()));
    let unexpected: Vec<String> = iterations
        .iter()
        .filter_map(|it| it.detail.clone())
        .collect();
    figure.detail(
        "unexpected",
        json!(unexpected.iter().take(20).collect::<Vec<_>>()),
    );
    figure.note(format!("outcomes per command: {kinds:?}"));
    for e in errors.iter().chain(&unexpected).take(3) {
        figure.note(e.clone());
    }
    figure
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_timeout_is_a_hang_and_a_disconnect_is_expected() {
        let timeout: Result<Value, Error> = Err(Error::Qmp {
            command: "query-status".into(),
            source: qmp_client::Error::CommandTimeout {
                command: "query-status".into(),
                waited: Duration::from_secs(2),
            },
        });
        assert_eq!(classify(&timeout), "CommandTimeout (hang)");
        assert!(!expected(classify(&timeout)));
        let closed: Result<Value, Error> = Err(Error::Qmp {
            command: "stop".into(),
            source: qmp_client::Error::Closed,
        });
        assert!(expected(classify(&closed)));
        assert!(expected(classify(&Ok(json!({})))));
        assert!(!expected(classify(&Err(Error::NoConsole))));
    }

    #[test]
    fn the_script_cycles_through_distinct_commands() {
        let names: std::collections::BTreeSet<&str> = (0..8).map(|i| script_step(i).0).collect();
        assert_eq!(names.len(), 8);
    }
}
