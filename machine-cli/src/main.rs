//! `qemu-machine`: run QEMU VMs, send QMP commands, a QMP shell and an event stream, as one
//! thin command over `machine-core` (which re-exports `qmp_client` and `console_socket`).
//!
//! This binary holds no socket or process code: connecting, launching, signalling and reaping
//! QEMU all happen in the library crates. What lives here is the command line (`args`), the
//! qmp-shell language (`lang`, pure and unit-tested), output formatting (`output`), and one
//! module per subcommand.
//!
//! Errors are printed once, with their chain of causes, and mapped to an exit status (see
//! `qemu-machine --help`). `RUST_LOG=debug` shows every QMP message with its direction.
//!
//! ```text
//! $ qemu-machine run --exit-after-banner
//! $ qemu-machine run --qmp-listen /tmp/qmp.sock &
//! $ qemu-machine qmp /tmp/qmp.sock query-status
//! $ qemu-machine shell /tmp/qmp.sock
//! $ qemu-machine events /tmp/qmp.sock --json
//! $ qemu-machine qom -s /tmp/qmp.sock tree /machine
//! $ qemu-machine run --linux --agent-listen /tmp/qga.sock &
//! $ qemu-machine ga /tmp/qga.sock exec /bin/uname -a
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod address;
mod args;
mod connect;
mod events_cmd;
mod fleet_cmd;
mod ga_cmd;
mod output;
mod qmp_cmd;
mod qom_cmd;
mod run_cmd;
mod shell;
mod sys;
mod wrap_cmd;

// The language and its errors live in the library target (so fuzz targets reach them).
use machine_cli::{error, lang};

use std::error::Error as _;
use std::io::{self, Write};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::args::{Cli, Command};
use crate::error::{Error, Result};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(error) => report(&error),
    }
}

/// Runs a subcommand; `Ok` carries the exit status (non-zero for `run` when the VM failed).
fn dispatch(command: Command) -> Result<u8> {
    match command {
        Command::Run(args) => run_cmd::run(args),
        Command::Qmp(args) => qmp_cmd::run(args),
        Command::Shell(args) => shell::run_connected(args),
        Command::Events(args) => events_cmd::run(args),
        Command::Qom(args) => qom_cmd::run(args),
        Command::Wrap(args) => wrap_cmd::run(args),
        Command::Fleet(args) => fleet_cmd::run(args),
        Command::Ga(args) => ga_cmd::run(args),
        Command::Completions(args) => {
            let mut command = Cli::command();
            let mut stdout = io::stdout().lock();
            clap_complete::generate(args.shell, &mut command, "qemu-machine", &mut stdout);
            stdout.flush().map_err(|source| Error::Io {
                what: "writing completions",
                source,
            })?;
            Ok(0)
        }
    }
}

/// Prints `error` and its causes once, and returns its exit status. A closed stdout (the
/// reader of a pipe went away) is not worth a message: exit quietly with success, like
/// ripgrep does.
fn report(error: &Error) -> ExitCode {
    if let Error::Io { source, .. } = error {
        if source.kind() == io::ErrorKind::BrokenPipe {
            return ExitCode::SUCCESS;
        }
    }
    let mut message = format!("qemu-machine: {error}");
    // The causes worth showing: when QEMU exited by itself during the launch, its exit
    // status and its own words are the reason, and what that did to our handshake is not.
    let mut causes: Vec<String> = Vec::new();
    let mut cause = error.source();
    while let Some(inner) = cause {
        causes.push(inner.to_string());
        if matches!(
            inner.downcast_ref::<machine_core::Error>(),
            Some(machine_core::Error::LaunchFailed {
                status: Some(_),
                killed: false,
                ..
            })
        ) {
            break;
        }
        cause = inner.source();
    }
    // Messages carry their cause's text (so each reads well alone): when the deepest cause
    // is already said, the chain adds nothing; else show each cause not said yet.
    if !causes
        .last()
        .is_some_and(|root| message.contains(root.as_str()))
    {
        for text in causes {
            if !message.contains(&text) {
                message.push_str(&format!("\n  caused by: {text}"));
            }
        }
    }
    if let Some(details) = error.details() {
        message.push('\n');
        message.push_str(&details);
    }
    output::note(&message);
    ExitCode::from(error.exit_code())
}
