//! The exit report: one value saying who ended the VM, how, and what it said last.
//!
//! The process's exit status decides the outcome; QEMU's SHUTDOWN event and the console only
//! add detail. A newer QEMU that sends an event before a failing exit (QEMU 10 and later send
//! `SHUTDOWN {"guest": true, "reason": "guest-shutdown"}` before an `isa-debug-exit` exit)
//! must never turn that failure into a clean guest power-off.

use std::fmt;
use std::time::Duration;

use jiff::fmt::friendly::{FractionalUnit, SpanPrinter};

use qmp_proto::Event;

use crate::ladder::{Step, StepRecord};
use crate::process::{signal_name, ExitStatus};

/// Who or what ended the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndedBy {
    /// Our QMP `quit` (from the shutdown ladder, or sent through [`crate::Machine::cmd`]).
    Quit,
    /// Our `system_powerdown`: the guest powered off (`reason` from QEMU's SHUTDOWN event).
    Powerdown {
        /// QEMU's SHUTDOWN reason, e.g. `guest-shutdown`.
        reason: Option<String>,
    },
    /// A signal we sent as a ladder step (e.g. SIGTERM in no-QMP mode).
    OurSignal {
        /// The signal.
        signal: i32,
    },
    /// Our SIGKILL (`kill()`, or the last rung of the ladder).
    Kill,
    /// The guest shut itself down (SHUTDOWN with `guest: true`).
    Guest {
        /// QEMU's reason, e.g. `guest-shutdown`, `guest-reset`, `guest-panic`.
        reason: String,
    },
    /// The host side asked QEMU to stop without us: another monitor's `quit`, a SIGTERM from
    /// someone else (`host-signal`), the UI...
    Host {
        /// QEMU's reason, e.g. `host-signal`, `host-qmp-quit`.
        reason: String,
    },
    /// A client of the shared QMP monitor sent `quit` (allowed by the owner's
    /// [`qmp_client::QuitPolicy`]), and QEMU quit.
    SharedClient {
        /// The client, as the multiplexer describes it (`QMP client 3 (unix pid 4242 uid 0)`).
        client: String,
    },
    /// QEMU exited on its own with a non-zero code (an error, or a failing guest). A SHUTDOWN
    /// event sent before the exit does not change this: the exit status decides.
    Exited {
        /// The exit code.
        code: i32,
    },
    /// The guest wrote `value` to an `isa-debug-exit` device (the command line has one): QEMU
    /// exits with `(value << 1) | 1`, so this is never a zero exit status.
    DebugExit {
        /// What the guest wrote to the port (the exit code is `(value << 1) | 1`).
        value: i32,
    },
    /// A signal we did not send ended QEMU (SIGKILL/SIGTERM/SIGINT/SIGHUP from elsewhere).
    ExternalSignal {
        /// The signal.
        signal: i32,
    },
    /// QEMU crashed (SIGSEGV, SIGABRT, SIGBUS, ...).
    Crash {
        /// The signal.
        signal: i32,
    },
}

impl fmt::Display for EndedBy {
    /// One clause naming what ended QEMU, e.g. `the guest powered off after our
    /// system_powerdown`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndedBy::Quit => f.write_str("qemu quit on our request"),
            EndedBy::Powerdown { reason } => match reason.as_deref() {
                Some("guest-shutdown") | None => {
                    f.write_str("the guest powered off after our system_powerdown")
                }
                Some(r) => write!(f, "the guest ended after our system_powerdown ({r})"),
            },
            EndedBy::OurSignal { signal } => {
                write!(f, "qemu stopped on our {}", signal_name(*signal))
            }
            EndedBy::SharedClient { client } => {
                write!(
                    f,
                    "qemu quit on a request from {client} on the shared monitor"
                )
            }
            EndedBy::Kill => f.write_str("we killed qemu"),
            EndedBy::Guest { reason } if reason == "guest-shutdown" => {
                f.write_str("the guest powered off")
            }
            EndedBy::Guest { reason } => write!(f, "the guest ended the run ({reason})"),
            EndedBy::Host { reason } if reason == "host-signal" => {
                f.write_str("qemu was stopped by a signal sent to it from outside (host-signal)")
            }
            EndedBy::Host { reason } => write!(f, "qemu was stopped from outside ({reason})"),
            EndedBy::Exited { .. } => f.write_str("qemu exited by itself"),
            EndedBy::DebugExit { value } => write!(
                f,
                "the guest asked to exit with {value} through isa-debug-exit"
            ),
            EndedBy::ExternalSignal { signal } => write!(
                f,
                "qemu was ended by a {} we did not send",
                signal_name(*signal)
            ),
            EndedBy::Crash { signal } => write!(f, "qemu crashed ({})", signal_name(*signal)),
        }
    }
}

/// A duration as people read it everywhere in this workspace: rounded to 2-3 significant
/// digits, in milliseconds below one second (`0.42ms`, `4.2ms`, `85ms`) and in seconds above
/// (`5.13s`, `12.3s`, `2m 5s`).
pub fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    let (step, unit) = match nanos {
        n if n >= 100_000_000_000 => (1_000_000_000, FractionalUnit::Second),
        n if n >= 10_000_000_000 => (100_000_000, FractionalUnit::Second),
        n if n >= 1_000_000_000 => (10_000_000, FractionalUnit::Second),
        n if n >= 10_000_000 => (1_000_000, FractionalUnit::Millisecond),
        n if n >= 1_000_000 => (100_000, FractionalUnit::Millisecond),
        _ => (10_000, FractionalUnit::Millisecond),
    };
    let rounded = (nanos + step / 2) / step * step;
    let rounded = Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX));
    SpanPrinter::new()
        .fractional(Some(unit))
        .unsigned_duration_to_string(&rounded)
}

/// What QEMU's SHUTDOWN event said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownEvent {
    /// `guest` in the event data: the guest asked for it.
    pub guest: bool,
    /// `reason` in the event data.
    pub reason: String,
}

impl ShutdownEvent {
    /// Reads a SHUTDOWN event; None for any other event.
    pub fn from_event(event: &Event) -> Option<ShutdownEvent> {
        if event.event != "SHUTDOWN" {
            return None;
        }
        let data = event.data.as_ref();
        let guest = data
            .and_then(|d| d.get("guest"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let reason = data
            .and_then(|d| d.get("reason"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        Some(ShutdownEvent { guest, reason })
    }
}

/// Everything known about one run of QEMU once it has ended.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExitReport {
    /// Who ended it.
    pub ended_by: EndedBy,
    /// How the process ended.
    pub status: ExitStatus,
    /// QEMU's process id ([`crate::Machine::pid`] is None once QEMU has exited).
    pub pid: u32,
    /// The SHUTDOWN event, if QEMU sent one.
    pub shutdown_event: Option<ShutdownEvent>,
    /// The shutdown ladder steps that ran, with their times (empty if QEMU was already gone).
    pub steps: Vec<StepRecord>,
    /// The last lines of QEMU's stdout and stderr.
    pub output_tail: Vec<String>,
    /// The last lines of the console, if there was one.
    pub console_tail: Vec<String>,
    /// The last QMP events (oldest first).
    pub last_events: Vec<Event>,
    /// The command line.
    pub command: String,
    /// From spawn to reap.
    pub uptime: Duration,
}

impl ExitReport {
    /// Whether the run ended cleanly: QEMU exited with status 0 because we or the guest asked
    /// for it (a guest reset or panic under `-no-reboot` / `-no-shutdown` is not clean). The exit
    /// status decides first: a non-zero exit is never clean, whatever events came before it.
    pub fn clean(&self) -> bool {
        if self.status != ExitStatus::Code(0) {
            return false;
        }
        match &self.ended_by {
            EndedBy::Quit
            | EndedBy::Powerdown { .. }
            | EndedBy::OurSignal { .. }
            | EndedBy::Host { .. }
            | EndedBy::SharedClient { .. } => true,
            EndedBy::Guest { reason } => reason == "guest-shutdown",
            _ => false,
        }
    }

    /// One plain sentence: what ended QEMU, its exit status and how long it ran, e.g.
    /// `the guest asked to exit with 3 through isa-debug-exit: exit code 7 ((3 << 1) | 1)
    /// after 85ms`.
    pub fn summary(&self) -> String {
        let mut text = format!("{}: {}", self.ended_by, self.status);
        if let EndedBy::DebugExit { value } = self.ended_by {
            text.push_str(&format!(" (({value} << 1) | 1)"));
        }
        text.push_str(" after ");
        text.push_str(&format_duration(self.uptime));
        // The event only adds detail; say so when it looks like a clean stop but was not one.
        if let (Some(event), false) = (&self.shutdown_event, self.clean()) {
            if matches!(
                self.ended_by,
                EndedBy::Exited { .. } | EndedBy::DebugExit { .. }
            ) {
                text.push_str(&format!(
                    " (qemu sent SHUTDOWN {} first)",
                    if event.guest {
                        format!("guest: {}", event.reason)
                    } else {
                        format!("host: {}", event.reason)
                    }
                ));
            }
        }
        text
    }
}

impl fmt::Display for ExitReport {
    /// The [`ExitReport::summary`] line, then the details: ladder steps, last events, QEMU's
    /// output, the console's last lines and the command line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary())?;
        for step in &self.steps {
            writeln!(f, "  step {step}")?;
        }
        if !self.last_events.is_empty() {
            let names: Vec<&str> = self.last_events.iter().map(|e| e.event.as_str()).collect();
            writeln!(f, "  last events: {}", names.join(", "))?;
        }
        for line in &self.output_tail {
            writeln!(f, "  output | {line}")?;
        }
        for line in &self.console_tail {
            writeln!(f, "  console | {line}")?;
        }
        write!(f, "  command: {}", self.command)
    }
}

/// What the classifier needs to know.
pub(crate) struct Facts<'a> {
    pub(crate) status: ExitStatus,
    /// The ladder step during which QEMU exited, if any.
    pub(crate) ended_during: Option<Step>,
    /// The user sent `quit` through `cmd`/`qmp`.
    pub(crate) quit_sent: bool,
    /// Signals we sent.
    pub(crate) sent_signals: &'a [i32],
    pub(crate) shutdown_event: Option<&'a ShutdownEvent>,
    /// The command line has an `isa-debug-exit` device: an odd exit code is the guest's.
    pub(crate) debug_exit_device: bool,
    /// The client of the shared monitor whose `quit` was forwarded to QEMU, if any.
    pub(crate) client_quit: Option<&'a str>,
}

/// Decides who ended the VM.
pub(crate) fn classify(facts: &Facts<'_>) -> EndedBy {
    if let Some(signal) = facts.status.signal() {
        if !facts.sent_signals.contains(&signal) {
            return if matches!(
                signal,
                libc::SIGKILL | libc::SIGTERM | libc::SIGINT | libc::SIGHUP | libc::SIGQUIT
            ) {
                EndedBy::ExternalSignal { signal }
            } else {
                EndedBy::Crash { signal }
            };
        }
    }
    // A non-zero exit code decides, whatever step ran or event came first.
    if let Some(code) = facts.status.code().filter(|c| *c > 0) {
        return if facts.debug_exit_device && code % 2 == 1 {
            EndedBy::DebugExit { value: code >> 1 }
        } else {
            EndedBy::Exited { code }
        };
    }
    let killed = facts.status.signal() == Some(libc::SIGKILL);
    // QEMU's own SHUTDOWN says it was stopped from outside (`host-signal`: someone sent it
    // SIGINT, SIGTERM or SIGHUP) while our powerdown or quit was still waiting: that, not
    // our request, ended it.
    let from_outside = facts
        .shutdown_event
        .filter(|e| !e.guest && e.reason == "host-signal");
    if let (Some(event), Some(Step::Powerdown { .. } | Step::Quit { .. })) =
        (from_outside, facts.ended_during)
    {
        return EndedBy::Host {
            reason: event.reason.clone(),
        };
    }
    match facts.ended_during {
        // QEMU may have exited by itself just before our SIGKILL landed: then the status,
        // not the step, tells.
        Some(Step::Kill { .. }) if killed => return EndedBy::Kill,
        // Reaped by the kernel (SIGCHLD ignored): no status tells, the step does.
        Some(Step::Kill { .. }) if facts.status == ExitStatus::UNKNOWN => return EndedBy::Kill,
        Some(Step::Signal { signal, .. }) => {
            return EndedBy::OurSignal {
                signal: signal as i32,
            }
        }
        Some(Step::Quit { .. }) => return EndedBy::Quit,
        Some(Step::Powerdown { .. }) => {
            return EndedBy::Powerdown {
                reason: facts.shutdown_event.map(|e| e.reason.clone()),
            }
        }
        _ => {}
    }
    if facts.status.signal() == Some(libc::SIGKILL) {
        return EndedBy::Kill;
    }
    if let Some(signal) = facts.status.signal() {
        return EndedBy::OurSignal { signal };
    }
    if facts.quit_sent {
        return EndedBy::Quit;
    }
    // A client's forwarded quit explains a host-side quit (or a clean exit with no SHUTDOWN
    // seen).
    if let Some(client) = facts.client_quit {
        let explained = match facts.shutdown_event {
            Some(e) => !e.guest && e.reason == "host-qmp-quit",
            None => facts.status.code() == Some(0),
        };
        if explained {
            return EndedBy::SharedClient {
                client: client.to_owned(),
            };
        }
    }
    match facts.shutdown_event {
        Some(e) if e.guest => EndedBy::Guest {
            reason: e.reason.clone(),
        },
        Some(e) => EndedBy::Host {
            reason: e.reason.clone(),
        },
        None => EndedBy::Exited {
            code: facts.status.code().unwrap_or(-1),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(name: &str, data: serde_json::Value) -> Event {
        serde_json::from_value(json!({"event": name, "data": data,
            "timestamp": {"seconds": 1, "microseconds": 2}}))
        .expect("event")
    }

    fn facts<'a>(status: ExitStatus, sent: &'a [i32], ev: Option<&'a ShutdownEvent>) -> Facts<'a> {
        Facts {
            status,
            ended_during: None,
            quit_sent: false,
            sent_signals: sent,
            shutdown_event: ev,
            debug_exit_device: false,
            client_quit: None,
        }
    }

    #[test]
    fn a_shared_clients_quit_is_named_only_when_qemu_quit_for_it() {
        let quit = ShutdownEvent {
            guest: false,
            reason: "host-qmp-quit".into(),
        };
        let guest = ShutdownEvent {
            guest: true,
            reason: "guest-shutdown".into(),
        };
        let client = "QMP client 2 (unix pid 7 uid 0)";
        let mut f = facts(ExitStatus::Code(0), &[], Some(&quit));
        f.client_quit = Some(client);
        assert_eq!(
            classify(&f),
            EndedBy::SharedClient {
                client: client.into()
            }
        );
        assert_eq!(
            classify(&f).to_string(),
            "qemu quit on a request from QMP client 2 (unix pid 7 uid 0) on the shared monitor"
        );
        // The guest powering off first is the guest's doing.
        f.shutdown_event = Some(&guest);
        assert!(matches!(classify(&f), EndedBy::Guest { .. }));
        // No SHUTDOWN seen: a clean exit after the forwarded quit; a failing one is not it.
        f.shutdown_event = None;
        assert!(matches!(classify(&f), EndedBy::SharedClient { .. }));
        f.status = ExitStatus::Code(1);
        assert!(matches!(classify(&f), EndedBy::Exited { code: 1 }));
        // Our own quit still wins.
        f.status = ExitStatus::Code(0);
        f.quit_sent = true;
        assert_eq!(classify(&f), EndedBy::Quit);
    }

    const KILLED: ExitStatus = ExitStatus::Signal {
        signal: libc::SIGKILL,
        core_dumped: false,
    };

    #[test]
    fn an_unknown_status_during_our_kill_step_is_our_kill() {
        let mut f = facts(ExitStatus::UNKNOWN, &[libc::SIGKILL], None);
        f.ended_during = Some(Step::Kill {
            timeout: Duration::from_secs(1),
        });
        assert_eq!(classify(&f), EndedBy::Kill);
        f.ended_during = None;
        assert_eq!(classify(&f), EndedBy::Exited { code: -1 });
        assert_eq!(ExitStatus::UNKNOWN.to_string(), "exit status unknown");
    }

    #[test]
    fn shutdown_event_is_read_from_its_data() {
        let e = event(
            "SHUTDOWN",
            json!({"guest": true, "reason": "guest-shutdown"}),
        );
        assert_eq!(
            ShutdownEvent::from_event(&e),
            Some(ShutdownEvent {
                guest: true,
                reason: "guest-shutdown".into()
            })
        );
        assert_eq!(ShutdownEvent::from_event(&event("STOP", json!({}))), None);
    }

    #[test]
    fn classification_table() {
        let guest = ShutdownEvent {
            guest: true,
            reason: "guest-shutdown".into(),
        };
        let host = ShutdownEvent {
            guest: false,
            reason: "host-signal".into(),
        };
        // Guest power-off seen while we only waited.
        assert_eq!(
            classify(&facts(ExitStatus::Code(0), &[], Some(&guest))),
            EndedBy::Guest {
                reason: "guest-shutdown".into()
            }
        );
        // Someone else's SIGTERM: QEMU exits 0 after SHUTDOWN host-signal.
        assert_eq!(
            classify(&facts(ExitStatus::Code(0), &[], Some(&host))),
            EndedBy::Host {
                reason: "host-signal".into()
            }
        );
        // An odd exit code without an isa-debug-exit device: QEMU's own.
        assert_eq!(
            classify(&facts(ExitStatus::Code(7), &[], None)),
            EndedBy::Exited { code: 7 }
        );
        // isa-debug-exit on QEMU 7.2: no event, odd exit code.
        let mut f = facts(ExitStatus::Code(7), &[], None);
        f.debug_exit_device = true;
        assert_eq!(classify(&f), EndedBy::DebugExit { value: 3 });
        // isa-debug-exit on QEMU 10 and later: SHUTDOWN guest-shutdown first, then the exit
        // status; the status decides.
        let mut f = facts(ExitStatus::Code(11), &[], Some(&guest));
        f.debug_exit_device = true;
        assert_eq!(classify(&f), EndedBy::DebugExit { value: 5 });
        f.debug_exit_device = false;
        assert_eq!(classify(&f), EndedBy::Exited { code: 11 });
        // An even code with the device is QEMU's own, not the guest's.
        let mut f = facts(ExitStatus::Code(2), &[], None);
        f.debug_exit_device = true;
        assert_eq!(classify(&f), EndedBy::Exited { code: 2 });
        // A failing exit during our quit step is still a failure.
        let mut f = facts(ExitStatus::Code(1), &[], Some(&host));
        f.ended_during = Some(Step::Quit {
            timeout: Duration::from_secs(1),
        });
        assert_eq!(classify(&f), EndedBy::Exited { code: 1 });
        // SIGKILL we did not send.
        assert_eq!(
            classify(&facts(KILLED, &[], None)),
            EndedBy::ExternalSignal {
                signal: libc::SIGKILL
            }
        );
        // SIGKILL we sent.
        assert_eq!(
            classify(&facts(KILLED, &[libc::SIGKILL], None)),
            EndedBy::Kill
        );
        // A crash.
        let segv = ExitStatus::Signal {
            signal: libc::SIGSEGV,
            core_dumped: true,
        };
        assert_eq!(
            classify(&facts(segv, &[], None)),
            EndedBy::Crash {
                signal: libc::SIGSEGV
            }
        );
        // Exit during our quit step (QEMU says `host-qmp-quit`).
        let our_quit = ShutdownEvent {
            guest: false,
            reason: "host-qmp-quit".into(),
        };
        let mut f = facts(ExitStatus::Code(0), &[], Some(&our_quit));
        f.ended_during = Some(Step::Quit {
            timeout: Duration::from_secs(1),
        });
        assert_eq!(classify(&f), EndedBy::Quit);
        // Exited by itself in the instant before our SIGKILL: not our kill.
        let mut f = facts(ExitStatus::Code(0), &[libc::SIGKILL], None);
        f.ended_during = Some(Step::Kill {
            timeout: Duration::from_secs(1),
        });
        assert_eq!(classify(&f), EndedBy::Exited { code: 0 });
        // A user quit through cmd(), then wait().
        let mut f = facts(ExitStatus::Code(0), &[], None);
        f.quit_sent = true;
        assert_eq!(classify(&f), EndedBy::Quit);
        // Exit during our SIGTERM step.
        let mut f = facts(ExitStatus::Code(0), &[libc::SIGTERM], Some(&host));
        f.ended_during = Some(Step::Signal {
            signal: crate::Signal::SIGTERM,
            timeout: Duration::from_secs(1),
        });
        assert_eq!(
            classify(&f),
            EndedBy::OurSignal {
                signal: libc::SIGTERM
            }
        );
        // A signal from outside stops QEMU while our powerdown waits: outside, not us.
        let outside = ShutdownEvent {
            guest: false,
            reason: "host-signal".into(),
        };
        for step in [
            Step::Powerdown {
                timeout: Duration::from_secs(1),
            },
            Step::Quit {
                timeout: Duration::from_secs(1),
            },
        ] {
            let mut f = facts(ExitStatus::Code(0), &[], Some(&outside));
            f.ended_during = Some(step);
            assert_eq!(
                classify(&f),
                EndedBy::Host {
                    reason: "host-signal".into()
                },
                "{step:?}"
            );
        }
        // Power button: the reason comes from the event.
        let mut f = facts(ExitStatus::Code(0), &[], Some(&guest));
        f.ended_during = Some(Step::Powerdown {
            timeout: Duration::from_secs(1),
        });
        assert_eq!(
            classify(&f),
            EndedBy::Powerdown {
                reason: Some("guest-shutdown".into())
            }
        );
    }
}

#[cfg(test)]
mod display_tests {
    use super::*;
    use crate::ladder::StepOutcome;

    fn report(ended_by: EndedBy, status: ExitStatus) -> ExitReport {
        ExitReport {
            ended_by,
            status,
            pid: 4242,
            shutdown_event: None,
            steps: Vec::new(),
            output_tail: Vec::new(),
            console_tail: Vec::new(),
            last_events: Vec::new(),
            command: "qemu -M none".into(),
            uptime: Duration::from_nanos(85_161_196),
        }
    }

    #[test]
    fn durations_have_two_or_three_significant_digits() {
        for (nanos, text) in [
            (0, "0ms"),
            (4_200, "0ms"),
            (420_000, "0.42ms"),
            (4_249_000, "4.2ms"),
            (85_161_196, "85ms"),
            (999_400_000, "999ms"),
            (1_000_000_000, "1s"),
            (1_500_000_000, "1.5s"),
            (5_138_000_000, "5.14s"),
            (12_345_000_000, "12.3s"),
            (125_400_000_000, "2m 5s"),
        ] {
            assert_eq!(
                format_duration(Duration::from_nanos(nanos)),
                text,
                "{nanos} ns"
            );
        }
    }

    #[test]
    fn summaries_are_one_plain_sentence() {
        let signal = |signal| ExitStatus::Signal {
            signal,
            core_dumped: false,
        };
        let reason = |r: &str| r.to_string();
        for (ended_by, status, text) in [
            (
                EndedBy::Quit,
                ExitStatus::Code(0),
                "qemu quit on our request: exit code 0 after 85ms",
            ),
            (
                EndedBy::Powerdown {
                    reason: Some(reason("guest-shutdown")),
                },
                ExitStatus::Code(0),
                "the guest powered off after our system_powerdown: exit code 0 after 85ms",
            ),
            (
                EndedBy::OurSignal {
                    signal: libc::SIGTERM,
                },
                ExitStatus::Code(0),
                "qemu stopped on our SIGTERM: exit code 0 after 85ms",
            ),
            (
                EndedBy::Kill,
                signal(libc::SIGKILL),
                "we killed qemu: signal 9 (SIGKILL) after 85ms",
            ),
            (
                EndedBy::Guest {
                    reason: reason("guest-shutdown"),
                },
                ExitStatus::Code(0),
                "the guest powered off: exit code 0 after 85ms",
            ),
            (
                EndedBy::Guest {
                    reason: reason("guest-panic"),
                },
                ExitStatus::Code(0),
                "the guest ended the run (guest-panic): exit code 0 after 85ms",
            ),
            (
                EndedBy::Host {
                    reason: reason("host-signal"),
                },
                ExitStatus::Code(0),
                "qemu was stopped by a signal sent to it from outside (host-signal): exit code 0 after 85ms",
            ),
            (
                EndedBy::Host {
                    reason: reason("host-ui"),
                },
                ExitStatus::Code(0),
                "qemu was stopped from outside (host-ui): exit code 0 after 85ms",
            ),
            (
                EndedBy::Exited { code: 1 },
                ExitStatus::Code(1),
                "qemu exited by itself: exit code 1 after 85ms",
            ),
            (
                EndedBy::DebugExit { value: 3 },
                ExitStatus::Code(7),
                "the guest asked to exit with 3 through isa-debug-exit: exit code 7 \
                 ((3 << 1) | 1) after 85ms",
            ),
            (
                EndedBy::ExternalSignal {
                    signal: libc::SIGKILL,
                },
                signal(libc::SIGKILL),
                "qemu was ended by a SIGKILL we did not send: signal 9 (SIGKILL) after 85ms",
            ),
            (
                EndedBy::Crash {
                    signal: libc::SIGSEGV,
                },
                signal(libc::SIGSEGV),
                "qemu crashed (SIGSEGV): signal 11 (SIGSEGV) after 85ms",
            ),
        ] {
            assert_eq!(report(ended_by, status).summary(), text);
        }
    }

    #[test]
    fn a_shutdown_event_before_a_failing_exit_is_detail_not_the_outcome() {
        let mut r = report(EndedBy::DebugExit { value: 5 }, ExitStatus::Code(11));
        r.shutdown_event = Some(ShutdownEvent {
            guest: true,
            reason: "guest-shutdown".into(),
        });
        assert!(!r.clean());
        assert_eq!(
            r.summary(),
            "the guest asked to exit with 5 through isa-debug-exit: exit code 11 ((5 << 1) | 1) \
             after 85ms (qemu sent SHUTDOWN guest: guest-shutdown first)"
        );
        let clean = report(
            EndedBy::Guest {
                reason: "guest-shutdown".into(),
            },
            ExitStatus::Code(0),
        );
        assert!(clean.clean());
        assert!(!report(
            EndedBy::Guest {
                reason: "guest-reset".into()
            },
            ExitStatus::Code(0)
        )
        .clean());
        assert!(!report(EndedBy::Kill, ExitStatus::Code(0)).clean());
    }

    #[test]
    fn report_display_names_cause_status_steps_and_tails() {
        let mut report = report(
            EndedBy::Kill,
            ExitStatus::Signal {
                signal: libc::SIGKILL,
                core_dumped: false,
            },
        );
        report.steps = vec![StepRecord {
            step: Step::Quit {
                timeout: Duration::from_secs(1),
            },
            started: Duration::ZERO,
            elapsed: Duration::from_secs(1),
            outcome: StepOutcome::TimedOut,
            note: None,
        }];
        report.output_tail = vec!["qemu: warning".into()];
        report.console_tail = vec!["guest> ".into()];
        let text = report.to_string();
        assert!(
            text.starts_with("we killed qemu: signal 9 (SIGKILL) after 85ms\n"),
            "{text}"
        );
        assert!(text.contains("quit, wait 1s -> TimedOut"), "{text}");
        assert!(text.contains("output | qemu: warning"), "{text}");
        assert!(text.contains("console | guest> "), "{text}");
        assert!(text.ends_with("command: qemu -M none"), "{text}");
    }

    #[test]
    fn machine_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<crate::Machine>();
        assert_send::<ExitReport>();
    }
}
