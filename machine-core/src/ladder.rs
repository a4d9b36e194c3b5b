//! The shutdown ladder as data: the steps to try in order, each with its own time budget, and
//! the record of what each step did. The executor is generic so it can be tested without a
//! process.

use std::fmt;
use std::time::{Duration, Instant};

use crate::report::format_duration;
use crate::Signal;

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
    /// Send `signal` (e.g. [`Signal::SIGTERM`]) and wait up to `timeout`.
    Signal {
        /// The signal to send.
        signal: Signal,
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
                crate::process::signal_name(*signal as i32),
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
                signal: Signal::SIGTERM,
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

/// Why a request step could not be sent, or what its reply said.
#[derive(Debug)]
pub(crate) enum RequestError {
    /// The monitor is gone (EOF, reset): QEMU may be exiting, so wait anyway.
    Transport(String),
    /// QEMU answered with an error: the request was refused, waiting is pointless.
    Refused(String),
}

/// The operations the ladder needs, none of which blocks; [`crate::Machine`] implements them
/// on a real process.
pub(crate) trait LadderOps {
    /// Whether QEMU has exited (reaping it if so).
    fn exited(&mut self) -> bool;
    /// Whether a QMP monitor is connected and usable (a monitor that has failed or closed
    /// cannot carry a request: the ladder then treats the machine as having none).
    fn has_qmp(&mut self) -> bool;
    /// Whether a `quit` was already sent.
    fn quit_sent(&self) -> bool;
    /// Sends a QMP command (no arguments) without waiting for its reply.
    fn submit(&mut self, command: &str) -> Result<(), RequestError>;
    /// The reply to the command submitted last, once it has come (`None` while pending).
    fn reply(&mut self) -> Option<Result<(), RequestError>>;
    /// Sends a signal.
    fn signal(&mut self, signal: i32) -> Result<(), String>;
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

/// The rung being walked.
#[derive(Debug)]
struct Rung {
    /// As recorded (a `Quit` without QMP becomes the SIGTERM it sends).
    step: Step,
    started: Instant,
    deadline: Instant,
    note: Option<String>,
    /// The outcome, when it was clear on entering the rung.
    decided: Option<StepOutcome>,
    /// The command whose reply is awaited.
    awaiting: Option<&'static str>,
    /// The transport error of the request, if it failed that way.
    transport: Option<String>,
}

/// A ladder being walked, one non-blocking [`Walk::advance`] at a time: the shutdown ladder
/// as a state machine. The blocking shutdown is a loop that waits until the deadline
/// `advance` returns (or a readiness event) and calls it again; a caller with its own event
/// loop does the same from there.
#[derive(Debug)]
pub(crate) struct Walk {
    steps: Vec<Step>,
    start: Instant,
    index: usize,
    entered: bool,
    current: Option<Rung>,
    records: Vec<StepRecord>,
    finished: Option<(Option<usize>, bool)>,
}

impl Walk {
    /// A walk of `ladder`, starting now.
    pub(crate) fn new(ladder: &ShutdownLadder) -> Walk {
        Walk {
            steps: ladder.steps().to_vec(),
            start: Instant::now(),
            index: 0,
            entered: false,
            current: None,
            records: Vec::new(),
            finished: None,
        }
    }

    /// The index of the step being walked (None before the first and once finished).
    pub(crate) fn step_index(&self) -> Option<usize> {
        self.current.as_ref().map(|_| self.index)
    }

    /// The number of steps.
    pub(crate) fn len(&self) -> usize {
        self.steps.len()
    }

    /// The current rung's deadline (None once finished).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.current.as_ref().map(|r| r.deadline)
    }

    /// Moves on as far as it can without blocking: takes the outcome of the current step if
    /// it is known, enters the next ones. Returns the deadline to call again by at the latest
    /// (earlier on readiness), or None once finished.
    pub(crate) fn advance(&mut self, ops: &mut dyn LadderOps) -> Option<Instant> {
        loop {
            if self.finished.is_some() {
                return None;
            }
            let Some(mut rung) = self.current.take() else {
                if !self.entered {
                    self.entered = true;
                    if ops.exited() {
                        self.finished = Some((None, true));
                        return None;
                    }
                }
                if self.index >= self.steps.len() {
                    self.finished = Some((None, false));
                    return None;
                }
                self.current = Some(self.enter(ops));
                continue;
            };
            match check(ops, &mut rung) {
                None => {
                    let deadline = rung.deadline;
                    self.current = Some(rung);
                    return Some(deadline);
                }
                Some(outcome) => {
                    let exited = outcome == StepOutcome::Exited;
                    self.records.push(StepRecord {
                        step: rung.step,
                        started: rung.started - self.start,
                        elapsed: rung.started.elapsed(),
                        outcome,
                        note: rung.note,
                    });
                    if exited {
                        self.finished = Some((Some(self.index), true));
                        return None;
                    }
                    self.index += 1;
                }
            }
        }
    }

    /// Starts step `self.index`: sends its request or signal.
    fn enter(&self, ops: &mut dyn LadderOps) -> Rung {
        let configured = self.steps[self.index];
        let started = Instant::now();
        let mut rung = Rung {
            step: configured,
            started,
            deadline: started + configured.timeout(),
            note: None,
            decided: None,
            awaiting: None,
            transport: None,
        };
        match configured {
            Step::Wait { .. } => {}
            // Before the monitor check: after our `quit` the monitor is closed on purpose.
            Step::Quit { .. } if ops.quit_sent() => {
                rung.note = Some("quit already sent".to_owned());
            }
            Step::Powerdown { .. } | Step::Quit { .. } if !ops.has_qmp() => {
                if let Step::Quit { timeout } = configured {
                    rung.step = Step::Signal {
                        signal: Signal::SIGTERM,
                        timeout,
                    };
                    send_signal(ops, libc::SIGTERM, &mut rung);
                } else {
                    rung.decided = Some(StepOutcome::Skipped {
                        reason: "no QMP monitor".to_owned(),
                    });
                }
            }
            Step::Powerdown { .. } | Step::Quit { .. } => {
                let command = if matches!(configured, Step::Quit { .. }) {
                    "quit"
                } else {
                    "system_powerdown"
                };
                match ops.submit(command) {
                    Ok(()) => rung.awaiting = Some(command),
                    Err(error) => take_request_error(ops, command, error, &mut rung),
                }
            }
            Step::Signal { signal, .. } => send_signal(ops, signal as i32, &mut rung),
            Step::Kill { .. } => send_signal(ops, libc::SIGKILL, &mut rung),
        }
        rung
    }

    /// How the walk ended (call once [`Walk::advance`] returned None).
    pub(crate) fn finish(self) -> LadderRun {
        let (ended_at, exited) = self.finished.unwrap_or((None, false));
        LadderRun {
            records: self.records,
            ended_at,
            exited,
        }
    }
}

/// A signal step's send; a failed send decides the step at once.
fn send_signal(ops: &mut dyn LadderOps, signal: i32, rung: &mut Rung) {
    if let Err(error) = ops.signal(signal) {
        rung.decided = Some(if ops.exited() {
            StepOutcome::Exited
        } else {
            StepOutcome::Failed { error }
        });
    }
}

/// A request that failed: refused ends the step at once, a transport failure waits on (QEMU
/// is probably exiting right now).
fn take_request_error(
    ops: &mut dyn LadderOps,
    command: &str,
    error: RequestError,
    rung: &mut Rung,
) {
    match error {
        RequestError::Transport(error) => {
            let text = format!("{command}: {error}");
            rung.note = Some(text.clone());
            rung.transport = Some(text);
        }
        RequestError::Refused(error) => {
            rung.decided = Some(if ops.exited() {
                StepOutcome::Exited
            } else {
                StepOutcome::Failed {
                    error: format!("{command}: {error}"),
                }
            });
        }
    }
}

/// The current step's outcome if it is known now.
fn check(ops: &mut dyn LadderOps, rung: &mut Rung) -> Option<StepOutcome> {
    if let Some(outcome) = rung.decided.take() {
        return Some(outcome);
    }
    if let Some(command) = rung.awaiting {
        if let Some(reply) = ops.reply() {
            rung.awaiting = None;
            if let Err(error) = reply {
                take_request_error(ops, command, error, rung);
                if let Some(outcome) = rung.decided.take() {
                    return Some(outcome);
                }
            }
        }
    }
    if ops.exited() {
        return Some(StepOutcome::Exited);
    }
    if Instant::now() < rung.deadline {
        return None;
    }
    if let Some(command) = rung.awaiting {
        // No reply within the step's budget: the request failed like a transport error.
        let error = format!("{command}: no reply within {:?}", rung.step.timeout());
        rung.note = Some(error.clone());
        return Some(StepOutcome::Failed { error });
    }
    Some(match &rung.transport {
        Some(error) => StepOutcome::Failed {
            error: error.clone(),
        },
        None => StepOutcome::TimedOut,
    })
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
        fn submit(&mut self, command: &str) -> Result<(), RequestError> {
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
        fn reply(&mut self) -> Option<Result<(), RequestError>> {
            Some(Ok(()))
        }
        fn signal(&mut self, signal: i32) -> Result<(), String> {
            self.hit(crate::process::signal_name(signal));
            Ok(())
        }
    }

    /// Walks `ladder` on `ops` to its end, sleeping until each deadline (the fake's outcomes
    /// are immediate).
    fn run(ops: &mut dyn LadderOps, ladder: &ShutdownLadder) -> LadderRun {
        let mut walk = Walk::new(ladder);
        while let Some(deadline) = walk.advance(ops) {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        }
        walk.finish()
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
            matches!(run.records[2].step, Step::Signal { signal, .. } if signal == Signal::SIGTERM)
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
            matches!(run.records[1].step, Step::Signal { signal, .. } if signal == Signal::SIGTERM)
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
        let mut fake = Fake::new(&["SIGKILL"]);
        fake.quit_sent = true;
        fake.alive = true;
        let run = run(&mut fake, &ShutdownLadder::graceful(T));
        assert_eq!(fake.log, vec!["SIGKILL"]);
        assert_eq!(run.records[0].note.as_deref(), Some("quit already sent"));
    }

    #[test]
    fn after_our_quit_a_closed_monitor_means_waiting_not_sigterm() {
        // The user's `quit` closed the monitor: the Quit step waits for the exit it asked for.
        let mut fake = Fake::new(&["SIGKILL"]);
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
