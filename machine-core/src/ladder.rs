//! The shutdown ladder as data: the steps to try in order, each with its own time budget, and
//! the record of what each step did. The executor is generic so it can be tested without a
//! process.

use std::fmt;
use std::time::{Duration, Instant};

use crate::report::format_duration;

/// The default graceful timeout, as `shutdown(timeout=30)` in QEMU's Python `qemu.machine`.
pub const DEFAULT_GRACEFUL_TIMEOUT: Duration = Duration::from_secs(30);
/// The default bound on reaping after SIGKILL, as `wait(timeout=60)` in QEMU's Python `qemu.machine`.
pub const DEFAULT_REAP_TIMEOUT: Duration = Duration::from_secs(60);

/// One rung of the ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Send nothing; wait up to `timeout` for QEMU to exit on its own (a guest power-off).
    Wait {
        /// How long to wait.
        timeout: Duration,
    },
    /// Send QMP `system_powerdown` (ACPI power button) and wait up to `timeout` for the exit.
    /// Skipped without a usable QMP monitor.
    Powerdown {
        /// Budget for the command and the exit together.
        timeout: Duration,
    },
    /// Send QMP `quit` (unless one was already sent) and wait up to `timeout` for the exit.
    /// End-of-file or a connection reset after `quit` is success. Without a QMP monitor this
    /// step sends SIGTERM instead, as QEMU's Python `qemu.machine` does; so it does when the monitor has already
    /// failed or closed (a `quit` could not arrive, and waiting for it would only burn the
    /// budget before a SIGKILL).
    Quit {
        /// Budget for the command and the exit together.
        timeout: Duration,
    },
    /// Send `signal` (e.g. `libc::SIGTERM`) and wait up to `timeout`.
    Signal {
        /// The signal number.
        signal: i32,
        /// How long to wait for the exit.
        timeout: Duration,
    },
    /// Send SIGKILL and reap within `timeout`. Always the last step.
    Kill {
        /// Bound on the reap.
        timeout: Duration,
    },
}

impl Step {
    /// The step's time budget.
    pub fn timeout(&self) -> Duration {
        match *self {
            Step::Wait { timeout }
            | Step::Powerdown { timeout }
            | Step::Quit { timeout }
            | Step::Signal { timeout, .. }
            | Step::Kill { timeout } => timeout,
        }
    }

    /// Whether this step forces the end (SIGKILL) rather than asking for it.
    pub fn is_forced(&self) -> bool {
        matches!(self, Step::Kill { .. })
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wait = |timeout: &Duration| format_duration(*timeout);
        match self {
            Step::Wait { timeout } => write!(f, "wait {}", wait(timeout)),
            Step::Powerdown { timeout } => write!(f, "system_powerdown, wait {}", wait(timeout)),
            Step::Quit { timeout } => write!(f, "quit, wait {}", wait(timeout)),
            Step::Signal { signal, timeout } => write!(
                f,
                "{}, wait {}",
                crate::process::signal_name(*signal),
                wait(timeout)
            ),
            Step::Kill { timeout } => write!(f, "SIGKILL, reap within {}", wait(timeout)),
        }
    }
}

/// An ordered list of [`Step`]s that always ends with [`Step::Kill`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownLadder {
    steps: Vec<Step>,
}

impl Default for ShutdownLadder {
    /// As in QEMU's Python `qemu.machine`: `quit` with 30 s for the exit, then SIGKILL with 60 s to reap.
    fn default() -> Self {
        ShutdownLadder::graceful(DEFAULT_GRACEFUL_TIMEOUT)
    }
}

impl ShutdownLadder {
    /// A ladder of `steps`. Steps after the first [`Step::Kill`] are dropped, and a
    /// `Kill` with [`DEFAULT_REAP_TIMEOUT`] is appended when there is none.
    pub fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        let mut out = Vec::new();
        for step in steps {
            let forced = step.is_forced();
            out.push(step);
            if forced {
                break;
            }
        }
        if !out.last().is_some_and(Step::is_forced) {
            out.push(Step::Kill {
                timeout: DEFAULT_REAP_TIMEOUT,
            });
        }
        ShutdownLadder { steps: out }
    }

    /// `quit`, wait up to `timeout`, then SIGKILL (`shutdown(timeout=...)` in QEMU's Python `qemu.machine`).
    pub fn graceful(timeout: Duration) -> Self {
        ShutdownLadder::new([Step::Quit { timeout }])
    }

    /// SIGKILL at once (`shutdown(hard=True)` / `kill()` in QEMU's Python `qemu.machine`).
    pub fn hard() -> Self {
        ShutdownLadder::new([])
    }

    /// Wait for a guest-initiated exit up to `timeout`, then SIGKILL (`wait()` in QEMU's Python `qemu.machine`).
    pub fn wait(timeout: Duration) -> Self {
        ShutdownLadder::new([Step::Wait { timeout }])
    }

    /// The long ladder: power button (T1), `quit` (T2), SIGTERM (T3), SIGKILL.
    pub fn escalating(powerdown: Duration, quit: Duration, sigterm: Duration) -> Self {
        ShutdownLadder::new([
            Step::Powerdown { timeout: powerdown },
            Step::Quit { timeout: quit },
            Step::Signal {
                signal: libc::SIGTERM,
                timeout: sigterm,
            },
        ])
    }

    /// The steps, the last one always [`Step::Kill`].
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepOutcome {
    /// QEMU exited during this step.
    Exited,
    /// The time budget ran out with QEMU still running.
    TimedOut,
    /// The step was not applicable (e.g. `system_powerdown` without QMP).
    Skipped {
        /// Why.
        reason: String,
    },
    /// Sending the request failed and QEMU did not exit within the budget either.
    Failed {
        /// The error, as text.
        error: String,
    },
}

/// One executed step with its timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    /// The step as configured (a `Quit` without QMP is recorded as the SIGTERM it became).
    pub step: Step,
    /// When it started, relative to the start of the shutdown.
    pub started: Duration,
    /// How long it took.
    pub elapsed: Duration,
    /// What happened.
    pub outcome: StepOutcome,
    /// A note, e.g. the error of a request that failed although QEMU then exited.
    pub note: Option<String>,
}

impl fmt::Display for StepRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "+{} {} -> {:?} after {}",
            format_duration(self.started),
            self.step,
            self.outcome,
            format_duration(self.elapsed)
        )?;
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

/// Why a request step could not be sent.
#[derive(Debug)]
pub(crate) enum RequestError {
    /// The monitor is gone (EOF, reset): QEMU may be exiting, so wait anyway.
    Transport(String),
    /// QEMU answered with an error: the request was refused, waiting is pointless.
    Refused(String),
}

/// The operations the ladder needs; [`crate::Machine`] implements them on a real process.
pub(crate) trait LadderOps {
    /// Whether QEMU has exited (reaping it if so).
    fn exited(&mut self) -> bool;
    /// Whether a QMP monitor is connected and usable (a monitor that has failed or closed
    /// cannot carry a request: the ladder then treats the machine as having none).
    fn has_qmp(&mut self) -> bool;
    /// Whether a `quit` was already sent.
    fn quit_sent(&self) -> bool;
    /// Sends a QMP command (no arguments) and waits for its reply until `deadline`.
    fn request(&mut self, command: &str, deadline: Instant) -> Result<(), RequestError>;
    /// Sends a signal.
    fn signal(&mut self, signal: i32) -> Result<(), String>;
    /// Waits for the exit until `deadline`; true if it exited.
    fn wait_exit(&mut self, deadline: Instant) -> Result<bool, String>;
}

/// The result of running a ladder.
#[derive(Debug)]
pub(crate) struct LadderRun {
    pub(crate) records: Vec<StepRecord>,
    /// Index of the step during which QEMU exited (None: it was already gone, or it never
    /// exited).
    pub(crate) ended_at: Option<usize>,
    /// Whether QEMU has exited at the end.
    pub(crate) exited: bool,
}

/// Runs `ladder` against `ops`, step by step, stopping as soon as QEMU has exited.
pub(crate) fn run(ops: &mut dyn LadderOps, ladder: &ShutdownLadder) -> LadderRun {
    let start = Instant::now();
    let mut records = Vec::new();
    if ops.exited() {
        return LadderRun {
            records,
            ended_at: None,
            exited: true,
        };
    }
    for (index, &configured) in ladder.steps().iter().enumerate() {
        let step_start = Instant::now();
        let deadline = step_start + configured.timeout();
        let mut step = configured;
        let mut note = None;
        let outcome = match configured {
            Step::Wait { .. } => wait_outcome(ops, deadline, &mut note),
            // Before the monitor check: after our `quit` the monitor is closed on purpose.
            Step::Quit { .. } if ops.quit_sent() => {
                note = Some("quit already sent".to_owned());
                wait_outcome(ops, deadline, &mut note)
            }
            Step::Powerdown { .. } | Step::Quit { .. } if !ops.has_qmp() => {
                if let Step::Quit { timeout } = configured {
                    step = Step::Signal {
                        signal: libc::SIGTERM,
                        timeout,
                    };
                    signal_outcome(ops, libc::SIGTERM, deadline, &mut note)
                } else {
                    StepOutcome::Skipped {
                        reason: "no QMP monitor".to_owned(),
                    }
                }
            }
            Step::Powerdown { .. } | Step::Quit { .. } => {
                let command = if matches!(configured, Step::Quit { .. }) {
                    "quit"
                } else {
                    "system_powerdown"
                };
                match ops.request(command, deadline) {
                    Ok(()) => wait_outcome(ops, deadline, &mut note),
                    Err(RequestError::Transport(error)) => {
                        // The monitor died under us: QEMU is probably exiting right now.
                        note = Some(format!("{command}: {error}"));
                        match wait_outcome(ops, deadline, &mut note) {
                            StepOutcome::TimedOut => StepOutcome::Failed {
                                error: format!("{command}: {error}"),
                            },
                            other => other,
                        }
                    }
                    Err(RequestError::Refused(error)) => {
                        if ops.exited() {
                            StepOutcome::Exited
                        } else {
                            StepOutcome::Failed {
                                error: format!("{command}: {error}"),
                            }
                        }
                    }
                }
            }
            Step::Signal { signal, .. } => signal_outcome(ops, signal, deadline, &mut note),
            Step::Kill { .. } => signal_outcome(ops, libc::SIGKILL, deadline, &mut note),
        };
        let exited = outcome == StepOutcome::Exited;
        records.push(StepRecord {
            step,
            started: step_start - start,
            elapsed: step_start.elapsed(),
            outcome,
            note,
        });
        if exited {
            return LadderRun {
                records,
                ended_at: Some(index),
                exited: true,
            };
        }
    }
    LadderRun {
        records,
        ended_at: None,
        exited: false,
    }
}

fn wait_outcome(
    ops: &mut dyn LadderOps,
    deadline: Instant,
    note: &mut Option<String>,
) -> StepOutcome {
    match ops.wait_exit(deadline) {
        Ok(true) => StepOutcome::Exited,
        Ok(false) => StepOutcome::TimedOut,
        Err(error) => {
            *note = Some(error.clone());
            StepOutcome::Failed { error }
        }
    }
}

fn signal_outcome(
    ops: &mut dyn LadderOps,
    signal: i32,
    deadline: Instant,
    note: &mut Option<String>,
) -> StepOutcome {
    match ops.signal(signal) {
        Ok(()) => wait_outcome(ops, deadline, note),
        Err(error) => {
            if ops.exited() {
                StepOutcome::Exited
            } else {
                StepOutcome::Failed { error }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted process: it exits when it receives one of `dies_on` (a command name or a
    /// signal name), after which waits report the exit.
    struct Fake {
        qmp: bool,
        quit_sent: bool,
        alive: bool,
        dies_on: Vec<&'static str>,
        transport_error_on: Vec<&'static str>,
        log: Vec<String>,
    }

    impl Fake {
        fn new(dies_on: &[&'static str]) -> Self {
            Fake {
                qmp: true,
                quit_sent: false,
                alive: true,
                dies_on: dies_on.to_vec(),
                transport_error_on: Vec::new(),
                log: Vec::new(),
            }
        }
        fn hit(&mut self, what: &'static str) {
            self.log.push(what.to_owned());
            if self.dies_on.contains(&what) {
                self.alive = false;
            }
        }
    }

    impl LadderOps for Fake {
        fn exited(&mut self) -> bool {
            !self.alive
        }
        fn has_qmp(&mut self) -> bool {
            self.qmp
        }
        fn quit_sent(&self) -> bool {
            self.quit_sent
        }
        fn request(&mut self, command: &str, _deadline: Instant) -> Result<(), RequestError> {
            let name: &'static str = match command {
                "quit" => "quit",
                "system_powerdown" => "system_powerdown",
                _ => "other",
            };
            self.hit(name);
            if self.transport_error_on.contains(&name) {
                return Err(RequestError::Transport("connection reset".into()));
            }
            Ok(())
        }
        fn signal(&mut self, signal: i32) -> Result<(), String> {
            self.hit(crate::process::signal_name(signal));
            Ok(())
        }
        fn wait_exit(&mut self, _deadline: Instant) -> Result<bool, String> {
            Ok(!self.alive)
        }
    }

    const T: Duration = Duration::from_millis(5);

    #[test]
    fn ladder_always_ends_with_kill_and_nothing_after_it() {
        let ladder = ShutdownLadder::new([Step::Quit { timeout: T }]);
        assert_eq!(
            ladder.steps(),
            &[
                Step::Quit { timeout: T },
                Step::Kill {
                    timeout: DEFAULT_REAP_TIMEOUT
                }
            ]
        );
        let ladder = ShutdownLadder::new([Step::Kill { timeout: T }, Step::Wait { timeout: T }]);
        assert_eq!(ladder.steps(), &[Step::Kill { timeout: T }]);
        assert_eq!(
            ShutdownLadder::default().steps()[0],
            Step::Quit {
                timeout: DEFAULT_GRACEFUL_TIMEOUT
            }
        );
        assert_eq!(ShutdownLadder::hard().steps().len(), 1);
    }

    #[test]
    fn quit_that_works_ends_the_ladder_at_step_zero() {
        let mut fake = Fake::new(&["quit"]);
        let run = run(&mut fake, &ShutdownLadder::graceful(T));
        assert_eq!(run.ended_at, Some(0));
        assert!(run.exited);
        assert_eq!(run.records.len(), 1);
        assert_eq!(run.records[0].outcome, StepOutcome::Exited);
        assert_eq!(fake.log, vec!["quit"]);
    }

    #[test]
    fn ignored_quit_escalates_to_kill() {
        let mut fake = Fake::new(&["SIGKILL"]);
        let run = run(&mut fake, &ShutdownLadder::graceful(T));
        assert_eq!(run.ended_at, Some(1));
        assert_eq!(run.records[0].outcome, StepOutcome::TimedOut);
        assert_eq!(run.records[1].outcome, StepOutcome::Exited);
        assert_eq!(fake.log, vec!["quit", "SIGKILL"]);
    }

    #[test]
    fn escalating_ladder_walks_every_rung_in_order() {
        let mut fake = Fake::new(&["SIGTERM"]);
        let run = run(&mut fake, &ShutdownLadder::escalating(T, T, T));
        assert_eq!(fake.log, vec!["system_powerdown", "quit", "SIGTERM"]);
        assert_eq!(run.ended_at, Some(2));
        assert!(
            matches!(run.records[2].step, Step::Signal { signal, .. } if signal == libc::SIGTERM)
        );
    }

    #[test]
    fn without_qmp_quit_becomes_sigterm_and_powerdown_is_skipped() {
        let mut fake = Fake::new(&["SIGTERM"]);
        fake.qmp = false;
        let run = run(&mut fake, &ShutdownLadder::escalating(T, T, T));
        assert_eq!(fake.log, vec!["SIGTERM"]);
        assert!(matches!(
            run.records[0].outcome,
            StepOutcome::Skipped { .. }
        ));
        assert!(
            matches!(run.records[1].step, Step::Signal { signal, .. } if signal == libc::SIGTERM)
        );
        assert_eq!(run.ended_at, Some(1));
    }

    #[test]
    fn reset_after_quit_still_counts_when_qemu_exits() {
        let mut fake = Fake::new(&["quit"]);
        fake.transport_error_on = vec!["quit"];
        let run = run(&mut fake, &ShutdownLadder::graceful(T));
        assert_eq!(run.ended_at, Some(0));
        assert_eq!(run.records[0].outcome, StepOutcome::Exited);
        assert!(run.records[0]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("reset")));
    }

    #[test]
    fn quit_already_sent_is_not_sent_again() {
        let mut fake = Fake::new(&[]);
        fake.quit_sent = true;
        fake.alive = true;
        let run = run(&mut fake, &ShutdownLadder::graceful(T));
        assert_eq!(fake.log, vec!["SIGKILL"]);
        assert_eq!(run.records[0].note.as_deref(), Some("quit already sent"));
    }

    #[test]
    fn after_our_quit_a_closed_monitor_means_waiting_not_sigterm() {
        // The user's `quit` closed the monitor: the Quit step waits for the exit it asked for.
        let mut fake = Fake::new(&[]);
        fake.quit_sent = true;
        fake.qmp = false;
        let run = run(&mut fake, &ShutdownLadder::graceful(T));
        assert_eq!(fake.log, vec!["SIGKILL"]);
        assert!(matches!(run.records[0].step, Step::Quit { .. }));
    }

    #[test]
    fn an_already_exited_process_runs_no_step() {
        let mut fake = Fake::new(&[]);
        fake.alive = false;
        let run = run(&mut fake, &ShutdownLadder::default());
        assert!(run.exited);
        assert_eq!(run.ended_at, None);
        assert!(run.records.is_empty());
        assert!(fake.log.is_empty());
    }

    #[test]
    fn a_shutdown_event_alone_never_kills_wait_is_just_waiting() {
        // `Wait` sends nothing; only the final Kill does.
        let mut fake = Fake::new(&["SIGKILL"]);
        let run = run(&mut fake, &ShutdownLadder::wait(T));
        assert_eq!(fake.log, vec!["SIGKILL"]);
        assert_eq!(run.records[0].outcome, StepOutcome::TimedOut);
    }
}
