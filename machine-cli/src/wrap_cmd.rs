//! `qemu-machine wrap -- QEMU ARGS...`: launch QEMU through `machine-core` and open the shell
//! on its QMP monitor (qmp-shell-wrap, without its socket file in the current directory: the
//! monitor is a socketpair).
//!
//! On a terminal, events are printed as they arrive, as `shell` does: the machine's QMP
//! connection is shared (`Machine::qmp_shared`) with the background event printer.
//!
//! When the shell ends (Ctrl-D, or `quit`), a QEMU still running is shut down (`quit`, then
//! SIGKILL after the timeout) and one line saying how it ended goes to stderr (the full exit
//! report after an abnormal end).

use std::time::Duration;

use std::io::IsTerminal;

use log::{debug, warn};
use machine_core::qmp_proto::Event;
use machine_core::{Args, Machine, MachineBuilder, ShutdownLadder};
use serde_json::Value;

use crate::args::WrapArgs;
use crate::error::{Error, Result};
use crate::lang::Request;
use crate::output;
use crate::shell::{self, EventPull, Monitor, MonitorError};

/// How long QEMU gets to exit after `quit` when the shell ends with QEMU still running.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The launched machine as the shell's monitor. With a background event printer (on a
/// terminal) the events are left to it: it pulls them from the machine's shared QMP handle.
struct MachineMonitor<'m> {
    machine: &'m mut Machine,
    printer: bool,
}

impl Monitor for MachineMonitor<'_> {
    fn request(&mut self, request: &Request) -> std::result::Result<Value, MonitorError> {
        let args = match &request.arguments {
            Some(map) => Args::exact(Value::Object(map.clone())),
            None => Args::none(),
        };
        self.machine
            .qmp(&request.execute, args)
            .map_err(|e| from_machine(&request.execute, e))
    }

    fn poll_events(&mut self) -> std::result::Result<Vec<Event>, MonitorError> {
        let mut events = Vec::new();
        if self.printer {
            return Ok(events);
        }
        loop {
            match self.machine.event(Duration::ZERO) {
                Ok(Some(event)) => events.push(event),
                Ok(None) => return Ok(events),
                Err(_) if !events.is_empty() => return Ok(events),
                Err(e) => return Err(from_machine("events", e)),
            }
        }
    }

    fn events_taken_elsewhere(&mut self) {
        self.printer = true;
    }
}

/// Sorts a machine error into closed, lost or failed, like a client error.
fn from_machine(command: &str, error: machine_core::Error) -> MonitorError {
    match error {
        machine_core::Error::Qmp { source, .. } => MonitorError::from_client(command, source),
        machine_core::Error::NotRunning => MonitorError::Closed,
        other => MonitorError::Failed(Error::Machine {
            what: "the QMP command",
            source: other,
        }),
    }
}

/// Runs `wrap`.
pub fn run(args: WrapArgs) -> Result<u8> {
    // A bad --logfile is a usage error: say so before QEMU starts.
    if let Some(path) = &args.shell.logfile {
        crate::shell::open_log(path)?;
    }
    if crate::run_cmd::find_program(&args.qemu).is_none() {
        return Err(Error::QemuNotFound {
            path: args.qemu.clone(),
        });
    }
    let mut builder = MachineBuilder::new(&args.qemu);
    builder
        .greeting_timeout(args.launch_timeout)
        .command_timeout(args.shell.timeout)
        .args(args.qemu_args.iter().cloned());
    let mut machine = builder.build();
    machine.launch().map_err(|source| Error::Launch {
        binary: args.qemu.clone(),
        source,
    })?;
    // None when QEMU already exited right after the handshake.
    let pid_text = machine
        .pid()
        .map_or_else(|| "already exited".to_string(), |p| format!("pid {p}"));
    let banner = match machine
        .qmp_connection()
        .ok()
        .and_then(|c| c.greeting().cloned())
    {
        Some(greeting) => {
            let v = greeting.version.qemu;
            format!(
                "Connected to QEMU {}.{}.{} ({})",
                v.major, v.minor, v.micro, pid_text
            )
        }
        None => "Connected to QEMU".to_string(),
    };
    let peer = format!("qemu {pid_text}");
    // On a terminal, events are printed as they arrive (as `shell` does): a background thread
    // waits on the machine's shared QMP handle while the shell sends commands through it.
    let background: Option<EventPull> = if std::io::stdin().is_terminal() && !args.no_live_events {
        match machine.qmp_shared() {
            Ok(events) => Some(Box::new(move |timeout| events.pull_event(timeout))),
            Err(error) => {
                debug!("no live events: {error}");
                None
            }
        }
    } else {
        None
    };
    let mut monitor = MachineMonitor {
        machine: &mut machine,
        printer: false,
    };
    let outcome = shell::run(&mut monitor, &args.shell, &banner, &peer, background);
    let ended = if machine.is_running() {
        machine.shutdown_with(&ShutdownLadder::graceful(QUIT_TIMEOUT))
    } else {
        machine.wait(Duration::from_secs(5))
    };
    match ended {
        Ok(report) => output::note_report(&report),
        Err(machine_core::Error::AbnormalShutdown { report, cause }) => {
            warn!("qemu had to be killed: {cause}");
            output::note_report(&report);
        }
        Err(error) => warn!("ending qemu: {error}"),
    }
    outcome
}
