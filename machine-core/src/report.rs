//! The exit report: one value saying who ended the VM, how, and what it said last.

use std::fmt;
use std::time::Duration;

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
    /// QEMU exited on its own without a SHUTDOWN event (an error, `isa-debug-exit`...).
    Exited {
        /// The exit code.
        code: i32,
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
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndedBy::Quit => f.write_str("our quit"),
            EndedBy::Powerdown { reason } => match reason {
                Some(r) => write!(f, "our system_powerdown (guest: {r})"),
                None => f.write_str("our system_powerdown"),
            },
            EndedBy::OurSignal { signal } => write!(f, "our {}", signal_name(*signal)),
            EndedBy::Kill => f.write_str("our SIGKILL"),
            EndedBy::Guest { reason } => write!(f, "guest shutdown ({reason})"),
            EndedBy::Host { reason } => write!(f, "host request ({reason})"),
            EndedBy::Exited { code } => write!(f, "qemu exited by itself with code {code}"),
            EndedBy::ExternalSignal { signal } => {
                write!(f, "external signal {signal} ({})", signal_name(*signal))
            }
            EndedBy::Crash { signal } => {
                write!(f, "crash: signal {signal} ({})", signal_name(*signal))
            }
        }
    }
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

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "qemu ended by {}: {} after {:?}",
            self.ended_by, self.status, self.uptime
        )?;
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
    let killed = facts.status.signal() == Some(libc::SIGKILL);
    match facts.ended_during {
        // QEMU may have exited by itself just before our SIGKILL landed: then the status,
        // not the step, tells.
        Some(Step::Kill { .. }) if killed => return EndedBy::Kill,
        // Reaped by the kernel (SIGCHLD ignored): no status tells, the step does.
        Some(Step::Kill { .. }) if facts.status == ExitStatus::UNKNOWN => return EndedBy::Kill,
        Some(Step::Signal { signal, .. }) => return EndedBy::OurSignal { signal },
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
        }
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
        // isa-debug-exit: no event, odd exit code.
        assert_eq!(
            classify(&facts(ExitStatus::Code(7), &[], None)),
            EndedBy::Exited { code: 7 }
        );
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
        // Exit during our quit step.
        let mut f = facts(ExitStatus::Code(0), &[], Some(&host));
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
            signal: libc::SIGTERM,
            timeout: Duration::from_secs(1),
        });
        assert_eq!(
            classify(&f),
            EndedBy::OurSignal {
                signal: libc::SIGTERM
            }
        );
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

    #[test]
    fn report_display_names_cause_status_steps_and_tails() {
        let report = ExitReport {
            ended_by: EndedBy::Kill,
            status: ExitStatus::Signal {
                signal: libc::SIGKILL,
                core_dumped: false,
            },
            pid: 4242,
            shutdown_event: None,
            steps: vec![StepRecord {
                step: Step::Quit {
                    timeout: Duration::from_secs(1),
                },
                started: Duration::ZERO,
                elapsed: Duration::from_secs(1),
                outcome: StepOutcome::TimedOut,
                note: None,
            }],
            output_tail: vec!["qemu: warning".into()],
            console_tail: vec!["guest> ".into()],
            last_events: Vec::new(),
            command: "qemu -M none".into(),
            uptime: Duration::from_millis(5),
        };
        let text = report.to_string();
        assert!(
            text.starts_with("qemu ended by our SIGKILL: signal 9 (SIGKILL)"),
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
