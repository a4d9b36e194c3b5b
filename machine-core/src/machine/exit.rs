//! Exit supervision: the blocking shutdown ladder (`shutdown`, `kill`, `wait`) over the
//! stepped walk, reaping, the exit report and the cleanup after QEMU is gone (also on drop).

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use mio::unix::SourceFd;

use crate::error::{Error, Result};
use crate::ladder::{self, ShutdownLadder, Step};
use crate::output::last_lines;
use crate::process::ExitStatus;
use crate::report::{classify, EndedBy, ExitReport, Facts, ShutdownEvent};

use super::{Machine, Run, OUTPUT_GRACE};

/// Lines of output and console in the exit report.
const REPORT_LINES: usize = 20;

impl Machine {
    /// Sends `signal` to QEMU now (no wait), for an owner stopping many machines at once.
    pub(crate) fn send_signal(&mut self, signal: i32) -> io::Result<()> {
        match self.run.as_mut() {
            Some(run) => run.child.signal(signal),
            None => Ok(()),
        }
    }

    /// Ends QEMU with the configured ladder (default: `quit`, wait 30 s, SIGKILL), cleans up
    /// and returns the exit report.
    ///
    /// If a graceful step fails and QEMU had to be killed, the result is
    /// [`Error::AbnormalShutdown`] with the cause and the report, after the same cleanup.
    /// Called after the exit, it just returns the last report.
    pub fn shutdown(&mut self) -> Result<ExitReport> {
        let ladder = self.config.ladder.clone();
        self.shutdown_with(&ladder)
    }

    /// Ends QEMU with `ladder` (see [`ShutdownLadder`]).
    pub fn shutdown_with(&mut self, ladder: &ShutdownLadder) -> Result<ExitReport> {
        if self.run.is_none() {
            return self.report.clone().ok_or(Error::NotRunning);
        }
        self.end_run(ladder)
    }

    /// SIGKILL, reap, clean up (`kill()` / `shutdown(hard=True)` in QEMU's Python `qemu.machine`).
    pub fn kill(&mut self) -> Result<ExitReport> {
        self.shutdown_with(&ShutdownLadder::hard())
    }

    /// Waits up to `timeout` for QEMU to exit by itself (a guest power-off), then cleans up;
    /// past the timeout it kills QEMU and returns [`Error::AbnormalShutdown`] (as
    /// `wait()` in QEMU's Python `qemu.machine`).
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitReport> {
        self.shutdown_with(&ShutdownLadder::wait(timeout))
    }

    /// The blocking shutdown: a loop over the stepped ladder ([`stepping`](super::stepping)), waiting on
    /// the run's own poll (QEMU's pidfd and the monitor) between steps.
    pub(super) fn end_run(&mut self, ladder: &ShutdownLadder) -> Result<ExitReport> {
        // A blocking call takes over from a stepped launch or ladder with its own ladder.
        self.launching = false;
        self.launch_deadline = None;
        self.stopping = None;
        self.stop_begin(ladder)?;
        while let Some(deadline) = self.stop_advance() {
            self.wait_run(deadline);
        }
        self.stop_finish()
    }

    /// What follows the walk: the report, or the error when QEMU survived or had to be forced.
    pub(super) fn end_walk(
        &mut self,
        ladder: &ShutdownLadder,
        ladder_run: ladder::LadderRun,
    ) -> Result<ExitReport> {
        let Some(run) = self.run.take() else {
            return Err(Error::NotRunning);
        };
        if !ladder_run.exited {
            let waited = ladder.steps().last().map(Step::timeout).unwrap_or_default();
            let pid = run.child.pid();
            log::error!("qemu pid {pid} survived SIGKILL for {waited:?}");
            // Keep it: a later call (or Drop) tries again.
            self.run = Some(run);
            return Err(Error::ReapTimeout { pid, waited });
        }
        let ended_during = ladder_run
            .ended_at
            .and_then(|i| ladder_run.records.get(i))
            .map(|r| r.step);
        let report = self.finish(run, ladder_run.records, ended_during);
        // Abnormal: we had to force it although the ladder had gentler steps first.
        let forced_fallback = matches!(ended_during, Some(Step::Kill { .. }))
            && report.ended_by == EndedBy::Kill
            && ladder.steps().len() > 1;
        if forced_fallback {
            let cause = report
                .steps
                .iter()
                .rev()
                .find(|r| !r.step.is_forced())
                .map(|r| match &r.outcome {
                    ladder::StepOutcome::TimedOut => Error::ExitTimeout { waited: r.elapsed },
                    other => Error::StepFailed {
                        step: r.step.to_string(),
                        detail: format!("{other:?}"),
                    },
                })
                .unwrap_or(Error::ExitTimeout {
                    waited: Duration::ZERO,
                });
            return Err(Error::AbnormalShutdown {
                report: Box::new(report),
                cause: Box::new(cause),
            });
        }
        Ok(report)
    }

    /// Cleans up after QEMU has been reaped and builds the report.
    fn finish(
        &mut self,
        mut run: Run,
        steps: Vec<ladder::StepRecord>,
        ended_during: Option<Step>,
    ) -> ExitReport {
        let status = run.child.status().unwrap_or(ExitStatus::Code(-1));
        // The shared monitor's clients are closed first; a client's forwarded quit is kept
        // for the report.
        let client_quit = run.share.take().and_then(|mut share| {
            share.stop();
            share.quit_by().map(|client| client.to_string())
        });
        // Events QEMU sent before it died (SHUTDOWN comes before quit's reply) are still in
        // the socket; keep them for events() and the report.
        if let Some(mut qmp) = run.qmp.take() {
            if !qmp.is_shared() {
                let raw = qmp.as_raw_fd();
                let _ = run.poll.registry().deregister(&mut SourceFd(&raw));
            }
            // A `quit` sent straight on the connection (qmp_connection, a shared handle) is
            // as much our request as one through `cmd`.
            self.quit_sent |= qmp.session().quit_sent();
            let leftovers = qmp.drain_events();
            for event in &leftovers {
                self.note_event(event);
                if let Some(shutdown) = ShutdownEvent::from_event(event) {
                    run.shutdown_event = Some(shutdown);
                }
            }
            self.leftover_events.extend(leftovers);
        }
        let tail = run.output.take().map(|drain| drain.finish(OUTPUT_GRACE));
        let log_text = tail.as_ref().map(|t| t.text()).unwrap_or_default();
        if let Some(tail) = tail.as_ref().filter(|t| t.dropped() > 0) {
            log::debug!(
                "qemu wrote {} bytes; the first {} are not kept in memory",
                tail.total(),
                tail.dropped()
            );
        }
        self.release_console_drainer(false);
        let console_tail = match self.console.as_mut() {
            Some(console) => {
                if let Err(err) = console.close() {
                    log::warn!("closing the console: {err}");
                }
                let bytes = console.tail(64 * 1024);
                last_lines(&String::from_utf8_lossy(&bytes), REPORT_LINES)
            }
            None => Vec::new(),
        };
        self.remove_temp_dir();
        let command = run.command.to_string();
        let sent = run.child.sent_signals().to_vec();
        if let Some(signal) = status.signal() {
            if !sent.contains(&signal) {
                log::warn!("qemu received signal {signal}; command: \"{command}\"");
            }
        }
        let ended_by = classify(&Facts {
            status,
            ended_during,
            quit_sent: self.quit_sent,
            sent_signals: &sent,
            shutdown_event: run.shutdown_event.as_ref(),
            debug_exit_device: run.command.has_device("isa-debug-exit"),
            client_quit: client_quit.as_deref(),
        });
        if matches!(ended_by, EndedBy::Crash { .. }) {
            log::warn!("qemu crashed: {status}");
        }
        let report = ExitReport {
            ended_by,
            status,
            pid: run.child.pid(),
            shutdown_event: run.shutdown_event.clone(),
            steps,
            output_tail: last_lines(&log_text, REPORT_LINES),
            console_tail,
            last_events: self.recent_events.iter().cloned().collect(),
            command,
            uptime: run.started.elapsed(),
        };
        log::info!(
            "qemu {} ended by {}: {status}",
            self.config.name,
            report.ended_by
        );
        self.log_text = Some(log_text);
        self.last_status = Some(status);
        self.report = Some(report.clone());
        report
    }

    pub(super) fn remove_temp_dir(&mut self) {
        if let Some(dir) = self.temp_dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(err) = dir.close() {
                // Removed underneath us counts as removed.
                if err.kind() != io::ErrorKind::NotFound {
                    log::warn!("cannot remove temp dir {}: {err}", path.display());
                }
            }
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.run.is_some() {
            match self.end_run(&ShutdownLadder::hard()) {
                Ok(report) => log::debug!("machine dropped while running: {}", report.ended_by),
                Err(err) => log::warn!("machine dropped while running: {err}"),
            }
        }
        self.remove_temp_dir();
    }
}
