//! `qemu-machine wrap -- QEMU ARGS...`: launch QEMU through `machine-core` and open the shell
//! on its QMP monitor (qmp-shell-wrap, without its socket file in the current directory: the
//! monitor is a socketpair).
//!
//! The shell talks straight to the machine's QMP connection (`Machine::qmp_connection`); on a
//! terminal, events are printed as they arrive, as `shell` does, from a shared handle on that
//! connection. A `quit` typed in the shell is seen by the machine (its session knows).
//!
//! When the shell ends (Ctrl-D, or `quit`), a QEMU still running is shut down (`quit`, then
//! SIGKILL after the timeout) and one line saying how it ended goes to stderr (the full exit
//! report after an abnormal end).

use std::time::Duration;

use std::io::IsTerminal;

use log::{debug, warn};
use machine_core::{MachineBuilder, ShutdownLadder};

use crate::args::WrapArgs;
use crate::error::{Error, Result};
use crate::output;
use crate::shell::{self, EventPull};

/// How long QEMU gets to exit after `quit` when the shell ends with QEMU still running.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

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
    if let Some((address, config)) = args.share.sharing() {
        builder.share_qmp(address, config);
    }
    let mut machine = builder.build();
    machine.launch().map_err(|source| Error::Launch {
        binary: args.qemu.clone(),
        source,
    })?;
    // None when QEMU already exited right after the handshake.
    let pid_text = machine
        .pid()
        .map_or_else(|| "already exited".to_string(), |p| format!("pid {p}"));
    if let Some(shared) = machine.sharing() {
        output::note(&format!(
            "QMP clients can attach to {}",
            shared.path.display()
        ));
    }
    let qmp = machine.qmp_connection().map_err(|source| Error::Machine {
        what: "the QMP connection",
        source,
    })?;
    let banner = match qmp.greeting() {
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
    // waits on a shared handle of the machine's QMP connection while the shell sends commands
    // on the connection itself.
    let background: Option<EventPull> = if std::io::stdin().is_terminal() && !args.no_live_events {
        match shell::event_pull(qmp) {
            Ok(pull) => Some(pull),
            Err(error) => {
                debug!("no live events: {error}");
                None
            }
        }
    } else {
        None
    };
    let outcome = shell::run(qmp, &args.shell, &banner, &peer, background);
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
