//! `qemu-machine fleet --count N [--json] [--exec CMD] [--exit-after-ready] [-- QEMU ARGS]`:
//! N copies of a VM (the built-in tiny guest by default) launched, driven and shut down from
//! one thread through `machine_core::Fleet`.
//!
//! Progress goes to stderr while they launch (launched / failed so far); then each member's
//! banner (tiny guest) or failure, each `--exec` reply, and after Ctrl-C (or at once with
//! `--exit-after-ready`) one summary line per member. The exit status is the worst member's,
//! as `run` computes it for one machine; a member that failed to launch counts as a launch
//! failure. Ctrl-C while they launch ends the launch at once (members still starting are
//! killed and shown as `aborted`, status 130) and shuts the others down; while the tiny
//! guests boot it is seen within 0.1 s.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use machine_core::console_socket::Pattern;
use machine_core::guest::{self, GuestMachine};
use machine_core::{Args, Fleet, MachineBuilder, MemberId};
use serde_json::{json, Value};

use crate::args::FleetArgs;
use crate::error::{Error, Result, EXIT_COMMAND, EXIT_INTERRUPTED, EXIT_LAUNCH};
use crate::run_cmd::{exit_code, find_program};
use crate::sys::signals::{self, Received};

/// Runs the command; the exit status of the worst member.
pub fn run(args: FleetArgs) -> Result<u8> {
    let (tx, rx) = mpsc::channel::<Received>();
    // First, before anything starts a thread: every thread must inherit the signal mask.
    let signals = signals::install(tx, |r| r, None)?;
    if find_program(&args.qemu).is_none() {
        return Err(Error::QemuNotFound {
            path: args.qemu.clone(),
        });
    }
    // Before anything starts: a bad --exec must not cost a launch.
    let exec = args.exec.as_deref().map(parse_exec).transpose()?;
    let out = Out { json: args.json };
    let tiny = args.qemu_args.is_empty();
    let mut fleet = Fleet::new().map_err(|source| Error::Machine {
        what: "creating the fleet",
        source,
    })?;
    fleet.set_spawn_cap(args.spawn_cap);
    for i in 0..args.count {
        let mut builder = MachineBuilder::new(&args.qemu);
        builder
            .name(format!("vm{i}"))
            .greeting_timeout(args.launch_timeout)
            .command_timeout(args.shutdown_timeout)
            .args(["-accel", "tcg"]);
        if tiny {
            builder.tiny_guest(GuestMachine::Q35);
        }
        builder.args(args.qemu_args.iter().cloned());
        let machine = builder.build();
        fleet.add(machine);
    }

    let count = args.count;
    let (mut launched, mut failed) = (0usize, 0usize);
    out.progress(&format!("launching {count} machines"));
    // Ctrl-C (or any terminating signal) during the launch ends it at once: the members
    // still starting are killed, the others are shut down below.
    let launches = fleet.launch_all_with_abort(signals.wakeup(), |_, result| {
        match result {
            Ok(()) => launched += 1,
            Err(_) => failed += 1,
        }
        out.progress(&format!("launched {launched}, failed {failed} of {count}"));
    });
    let mut stop = rx.try_recv().ok();
    let mut worst = 0u8;
    for (id, result) in &launches {
        if let Err(err) = result {
            if stop.is_some() && is_aborted(err) {
                // Stopped on request, not failed; `run` says 130 for a launch a signal ended.
                worst = worst.max(EXIT_INTERRUPTED);
                out.line(
                    *id,
                    "aborted",
                    "launch stopped by the signal",
                    json!({"aborted": true}),
                );
                continue;
            }
            worst = worst.max(EXIT_LAUNCH);
            out.line(
                *id,
                "failed",
                &format!("did not launch: {}", chain(err)),
                json!({"error": chain(err)}),
            );
        }
    }
    let running: Vec<MemberId> = fleet.running().collect();

    // The banner of each tiny guest, all booting at once: one deadline for all.
    let mut ready = Vec::new();
    if tiny && stop.is_none() {
        let deadline = Instant::now() + args.launch_timeout;
        let banner = Pattern::from(guest::BANNER);
        for &id in &running {
            let seen = match fleet.machine(id).console() {
                Ok(console) => wait_or_signal(console, &banner, deadline, &rx, &mut stop),
                Err(err) => Err(chain(&err)),
            };
            if stop.is_some() {
                break;
            }
            match seen {
                Ok(_) => {
                    ready.push(id);
                    out.line(
                        id,
                        "banner",
                        guest::BANNER,
                        json!({"banner": guest::BANNER}),
                    );
                }
                Err(err) => {
                    worst = worst.max(EXIT_LAUNCH);
                    out.line(
                        id,
                        "failed",
                        &format!("no banner: {err}"),
                        json!({"error": err}),
                    );
                }
            }
        }
    } else if stop.is_none() {
        ready = running.clone();
    }
    if stop.is_none() {
        out.progress(&format!("{} of {count} ready", ready.len()));
    }

    if let (Some((command, arguments)), None) = (exec, stop) {
        let timeout = args.shutdown_timeout;
        let replies = match arguments {
            Value::Null => fleet.qmp_all(&ready, &command, (), timeout),
            // Given in QMP's own spelling: no key conversion.
            value => fleet.qmp_all(&ready, &command, Args::exact(value), timeout),
        };
        for (id, reply) in replies {
            match reply {
                Ok(reply) => {
                    if reply.get("error").is_some() {
                        worst = worst.max(EXIT_COMMAND);
                    }
                    out.line(id, "reply", &reply.to_string(), json!({"reply": reply}));
                }
                Err(err) => {
                    worst = worst.max(EXIT_COMMAND);
                    out.line(
                        id,
                        "failed",
                        &format!("{command}: {}", chain(&err)),
                        json!({"command": command, "error": chain(&err)}),
                    );
                }
            }
        }
    }

    if !args.exit_after_ready && stop.is_none() {
        out.progress("running; Ctrl-C shuts all down");
        // Any terminating signal (or the signal thread ending) starts the shutdown.
        let _ = rx.recv();
    }
    out.progress(&format!(
        "shutting down {} machines",
        fleet.running().count()
    ));
    for (id, result) in fleet.shutdown_all(args.shutdown_timeout) {
        let (code, text, object) = match result {
            Ok(report) => {
                let code = exit_code(&report);
                (
                    code,
                    format!(
                        "pid {}: ended by {}, {}",
                        report.pid, report.ended_by, report.status
                    ),
                    json!({"pid": report.pid, "ended_by": report.ended_by.to_string(),
                        "status": report.status.to_string(), "clean": report.clean()}),
                )
            }
            Err(err) => {
                let code = match &err {
                    machine_core::Error::AbnormalShutdown { report, .. } => {
                        exit_code(report).max(1)
                    }
                    _ => 1,
                };
                (code, chain(&err), json!({"error": chain(&err)}))
            }
        };
        worst = worst.max(code);
        out.line(id, "exit", &text, object);
    }
    Ok(worst)
}

/// How often a banner wait looks for a signal: Ctrl-C while the guests boot is seen within
/// this (a console wait has no fd to watch beside the signal).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Waits for `pattern` on `console` until `deadline`, in slices of [`SIGNAL_CHECK`], ending
/// early (with `stop` set) when a signal arrives.
fn wait_or_signal(
    console: &mut machine_core::console_socket::Console,
    pattern: &Pattern,
    deadline: Instant,
    rx: &mpsc::Receiver<Received>,
    stop: &mut Option<Received>,
) -> std::result::Result<(), String> {
    use machine_core::console_socket::Error as ConsoleError;
    let started = Instant::now();
    loop {
        if let Ok(signal) = rx.try_recv() {
            *stop = Some(signal);
            return Err("stopped by the signal".to_string());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match console.wait_for(pattern, left.min(SIGNAL_CHECK)) {
            Ok(_) => return Ok(()),
            Err(ConsoleError::Timeout { .. }) if Instant::now() < deadline => {}
            // Say the whole wait, not the last slice.
            Err(ConsoleError::Timeout {
                waiting_for,
                recent,
                ..
            }) => {
                return Err(chain(&ConsoleError::Timeout {
                    waiting_for,
                    timeout: started.elapsed(),
                    recent,
                }))
            }
            Err(err) => return Err(chain(&err)),
        }
    }
}

/// Whether a launch error is the abort of `launch_all_with_abort` (the member was stopped,
/// not broken).
fn is_aborted(err: &machine_core::Error) -> bool {
    match err {
        machine_core::Error::LaunchAborted => true,
        machine_core::Error::LaunchFailed { cause, .. } => {
            matches!(**cause, machine_core::Error::LaunchAborted)
        }
        _ => false,
    }
}

/// `NAME` or `NAME {JSON ARGUMENTS}`.
fn parse_exec(text: &str) -> Result<(String, Value)> {
    let text = text.trim();
    let (name, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let arguments = match rest.trim() {
        "" => Value::Null,
        json => serde_json::from_str(json).map_err(|e| Error::BadRawCommand {
            reason: format!("--exec {name}: the arguments are not JSON: {e}"),
        })?,
    };
    if !(arguments.is_null() || arguments.is_object()) {
        return Err(Error::BadRawCommand {
            reason: format!("--exec {name}: the arguments must be a JSON object"),
        });
    }
    Ok((name.to_string(), arguments))
}

/// An error with its causes, on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Where lines go: stdout (one per member event, text or JSON Lines), progress on stderr.
struct Out {
    json: bool,
}

impl Out {
    fn line(&self, id: MemberId, kind: &str, text: &str, mut object: Value) {
        if self.json {
            if let Value::Object(map) = &mut object {
                map.insert("member".into(), json!(id.index()));
                map.insert("type".into(), json!(kind));
            }
            println!("{object}");
        } else {
            println!("vm{} {kind}: {text}", id.index());
        }
    }

    fn progress(&self, text: &str) {
        eprintln!("fleet: {text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_is_a_name_and_maybe_json_arguments() {
        let (name, args) = parse_exec("query-status").expect("bare name");
        assert_eq!(name, "query-status");
        assert!(args.is_null());
        let (name, args) = parse_exec(r#"human-monitor-command {"command-line": "info version"}"#)
            .expect("with arguments");
        assert_eq!(name, "human-monitor-command");
        assert_eq!(args["command-line"], "info version");
        assert!(parse_exec("stop [1]").is_err());
        assert!(parse_exec("stop {oops").is_err());
    }

    #[test]
    fn chain_joins_the_causes() {
        let err = Error::Machine {
            what: "x",
            source: machine_core::Error::NotRunning,
        };
        let text = chain(&err);
        assert!(
            text.contains(&machine_core::Error::NotRunning.to_string()),
            "{text}"
        );
    }
}
