//! Figure "greeting timeout accuracy": a real QEMU SIGSTOPped right after its exec never
//! greets; the launch must fail with the handshake timeout at T ± 100 ms, QEMU killed and
//! reaped.
//!
//! The launch runs in a helper thread while this thread watches /proc for the new child: as
//! soon as its comm turns into `qemu-system-*` (the exec happened, about 20 ms before QEMU
//! could greet) it gets SIGSTOP. Should QEMU win the race and complete the handshake, the
//! attempt is retried (and counted).

use std::time::{Duration, Instant};

use machine_core::Error;
use nix::sys::signal::Signal;
use serde_json::json;

use super::{chain, sys, Figure, Settings};

/// Allowed distance between the configured timeout and the launch's error.
const SLACK: Duration = Duration::from_millis(100);
/// Attempts per sample before giving up on winning the SIGSTOP race.
const ATTEMPTS: usize = 3;

struct Sample {
    timeout: Duration,
    elapsed: Duration,
    cause: String,
    killed_and_reaped: bool,
}

enum Outcome {
    Sample(Sample),
    RaceLost,
}

fn attempt(settings: &Settings, timeout: Duration) -> Result<Outcome, String> {
    let known = sys::known_children();
    std::thread::scope(|scope| {
        let launcher = scope.spawn(|| {
            let mut builder = settings.none_machine();
            // The negotiation after the greeting runs on the command timeout: bound it too,
            // so an attempt whose SIGSTOP landed after the greeting costs T, not 10 s.
            builder.greeting_timeout(timeout).command_timeout(timeout);
            let mut vm = builder.build();
            let t0 = Instant::now();
            let result = vm.launch();
            let elapsed = t0.elapsed();
            if result.is_ok() {
                let _ = vm.kill();
            }
            (elapsed, result)
        });
        let stopped = match sys::wait_new_child(&known, "qemu-system", Duration::from_secs(5)) {
            Some(pid) => sys::signal(pid, Signal::SIGSTOP).map(|()| pid),
            None => Err("no qemu child appeared within 5 s".to_owned()),
        };
        let (elapsed, result) = launcher
            .join()
            .map_err(|_| "the launch thread panicked".to_owned())?;
        let pid = stopped?;
        match result {
            Ok(()) => Ok(Outcome::RaceLost),
            Err(Error::LaunchFailed {
                status,
                killed,
                cause,
                ..
            }) if !chain(cause.as_ref()).contains("no QMP greeting within") => {
                // Stopped after the greeting: a negotiation timeout, not what we measure.
                let _ = (status, killed);
                Ok(Outcome::RaceLost)
            }
            Err(Error::LaunchFailed {
                status,
                killed,
                cause,
                ..
            }) => {
                let gone = !sys::children().contains_key(&(pid as i32));
                Ok(Outcome::Sample(Sample {
                    timeout,
                    elapsed,
                    cause: chain(cause.as_ref()),
                    killed_and_reaped: killed
                        && status.and_then(|s| s.signal()) == Some(libc::SIGKILL)
                        && gone,
                }))
            }
            Err(other) => Err(format!("unexpected error: {}", chain(&other))),
        }
    })
}

/// Runs the figure.
pub fn run(settings: &Settings) -> Figure {
    let mut figure = Figure::new("greeting-timeout");
    let mut samples: Vec<Sample> = Vec::new();
    let mut races_lost = 0usize;
    let mut errors: Vec<String> = Vec::new();
    for &(timeout, repeats) in &settings.greeting {
        for _ in 0..repeats {
            let mut done = false;
            for _ in 0..ATTEMPTS {
                match attempt(settings, timeout) {
                    Ok(Outcome::Sample(s)) => {
                        eprintln!(
                            "  greeting: T = {timeout:?}: error after {:.1} ms",
                            s.elapsed.as_secs_f64() * 1e3
                        );
                        samples.push(s);
                        done = true;
                        break;
                    }
                    Ok(Outcome::RaceLost) => races_lost += 1,
                    Err(e) => {
                        errors.push(e);
                        break;
                    }
                }
            }
            if !done && errors.is_empty() {
                errors.push(format!(
                    "T = {timeout:?}: QEMU greeted before SIGSTOP {ATTEMPTS} times"
                ));
            }
        }
    }
    let wanted: usize = settings.greeting.iter().map(|(_, n)| n).sum();
    figure.check(
        "samples measured",
        wanted.to_string(),
        format!("{} ({} errors)", samples.len(), errors.len()),
        samples.len() == wanted && errors.is_empty(),
    );
    for &(timeout, _) in &settings.greeting {
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.timeout == timeout).collect();
        let deviations: Vec<f64> = mine
            .iter()
            .map(|s| (s.elapsed.as_secs_f64() - timeout.as_secs_f64()) * 1e3)
            .collect();
        let worst = deviations.iter().copied().map(f64::abs).fold(0.0, f64::max);
        let min = deviations.iter().copied().fold(f64::INFINITY, f64::min);
        let max = deviations.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        figure.check(
            format!("timeout fires at T = {} s", timeout.as_secs()),
            "T ± 100 ms (p100)",
            if mine.is_empty() {
                "no sample".to_owned()
            } else {
                format!("T {min:+.1} .. {max:+.1} ms (n={})", mine.len())
            },
            !mine.is_empty() && worst <= SLACK.as_secs_f64() * 1e3,
        );
    }
    let reaped = samples.iter().filter(|s| s.killed_and_reaped).count();
    figure.check(
        "then killed (SIGKILL) and reaped",
        format!("{}/{}", samples.len(), samples.len()),
        format!("{reaped}/{}", samples.len()),
        reaped == samples.len() && !samples.is_empty(),
    );
    let greeting_typed = samples
        .iter()
        .filter(|s| s.cause.contains("no QMP greeting within"))
        .count();
    figure.check(
        "cause is the typed greeting timeout",
        format!("{}/{}", samples.len(), samples.len()),
        format!("{greeting_typed}/{}", samples.len()),
        greeting_typed == samples.len() && !samples.is_empty(),
    );
    figure.detail(
        "samples",
        json!(samples
            .iter()
            .map(|s| json!({"timeout_s": s.timeout.as_secs_f64(),
                "elapsed_ms": super::round3(s.elapsed.as_secs_f64() * 1e3),
                "cause": s.cause}))
            .collect::<Vec<_>>()),
    );
    figure.detail("sigstop_races_lost", json!(races_lost));
    figure.detail("errors", json!(errors));
    if !settings
        .greeting
        .iter()
        .any(|(t, _)| *t == Duration::from_secs(30))
    {
        figure.note("T = 30 s is measured in full mode only");
    }
    for e in errors.iter().take(3) {
        figure.note(e.clone());
    }
    figure
}
