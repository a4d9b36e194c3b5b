//! `QtestMachine`: a [`Machine`] whose every launch also opens a qtest channel over a fresh
//! socketpair (the Rust form of `QEMUQtestMachine`).

use std::ffi::OsString;
use std::ops::{Deref, DerefMut};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::error::Error as QtestError;
use super::protocol::{Config, QtestProtocol};
use crate::{Error, ExitReport, Machine, Result};

/// Which accelerator a [`QtestMachine`] asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum QtestAccel {
    /// Append `-accel qtest` (what `QEMUQtestMachine` does): no vCPU runs, and the virtual
    /// clock moves only through `clock_step`/`clock_set`. An `-accel` already in the
    /// machine's arguments comes first and wins. Distribution builds may lack this
    /// accelerator (Debian's QEMU 7.2 does): QEMU then exits with "invalid accelerator
    /// qtest" and the launch fails with [`Error::LaunchFailed`].
    #[default]
    Qtest,
    /// Add no accelerator: the machine's own arguments decide (e.g. `-accel tcg -S` for a
    /// stopped machine whose devices qtest drives). `clock_step`/`clock_set` then fail with
    /// `FAIL Unknown command`.
    FromArgs,
}

/// A [`Machine`] with a qtest channel.
///
/// Each [`launch`](Self::launch) creates a socketpair, hands one end to QEMU for that launch
/// only ([`Machine::pass_fd_once`]) with `-chardev socket,id=qtest,fd=N -qtest chardev:qtest`
/// (plus `-qtest-log`, and `-accel qtest` per [`QtestAccel`]), and wraps the other end in a
/// [`QtestProtocol`], available through [`qtest`](Self::qtest) while the machine runs. The
/// arguments are per launch: the machine's own argument list is left as it was.
///
/// Everything else is the wrapped [`Machine`], reachable through `Deref`/`DerefMut` (QMP,
/// events, console, log); [`shutdown`](Self::shutdown), [`kill`](Self::kill) and
/// [`wait`](Self::wait) also drop the qtest channel.
///
/// ```no_run
/// use machine_core::qtest::{QtestAccel, QtestMachine};
/// use machine_core::MachineBuilder;
///
/// # fn main() -> machine_core::Result<()> {
/// let machine = MachineBuilder::new("qemu-system-x86_64")
///     .machine_type("pc")
///     .args(["-nodefaults", "-accel", "tcg", "-S"])
///     .build();
/// let mut vm = QtestMachine::new(machine).with_accel(QtestAccel::FromArgs);
/// vm.launch()?;
/// vm.qtest()?.outl(0xcf8, 0x8000_0b40)?;
/// let pm = vm.qtest()?.inl(0xcfc)?;
/// let status = vm.cmd("query-status", ())?; // QMP still works; one error type for both
/// # let _ = (pm, status);
/// vm.shutdown()?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct QtestMachine {
    machine: Machine,
    config: Config,
    accel: QtestAccel,
    log: Option<PathBuf>,
    qtest: Option<QtestProtocol>,
}

impl QtestMachine {
    /// Wraps a configured (not yet launched) machine.
    pub fn new(machine: Machine) -> Self {
        QtestMachine {
            machine,
            config: Config::default(),
            accel: QtestAccel::default(),
            log: None,
            qtest: None,
        }
    }

    /// The [`QtestProtocol`] settings for the next launches.
    pub fn with_config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// The accelerator choice for the next launches (default [`QtestAccel::Qtest`]).
    pub fn with_accel(mut self, accel: QtestAccel) -> Self {
        self.accel = accel;
        self
    }

    /// Where QEMU logs the qtest traffic (`-qtest-log PATH`). Default None: `/dev/null`,
    /// because without `-qtest-log` QEMU writes every command and reply to its stderr.
    pub fn with_qtest_log(mut self, path: Option<PathBuf>) -> Self {
        self.log = path;
        self
    }

    /// Launches QEMU with the qtest channel; see [`Machine::launch`] for the rest.
    pub fn launch(&mut self) -> Result<()> {
        if self.machine.is_running() {
            return Err(Error::AlreadyRunning {
                pid: self.machine.pid().unwrap_or_default(),
            });
        }
        self.qtest = None;
        let (ours, theirs) = UnixStream::pair().map_err(|source| Error::Os {
            what: "qtest socketpair",
            source,
        })?;
        ours.set_nonblocking(true).map_err(|source| Error::Os {
            what: "qtest socket nonblocking",
            source,
        })?;
        let fd = self.machine.pass_fd_once(OwnedFd::from(theirs));
        let log = self
            .log
            .as_ref()
            .map(|p| p.as_os_str().to_owned())
            .unwrap_or_else(|| OsString::from("/dev/null"));
        let mut extra: Vec<OsString> = vec![
            "-chardev".into(),
            format!("socket,id=qtest,fd={fd}").into(),
            "-qtest".into(),
            "chardev:qtest".into(),
            "-qtest-log".into(),
            log,
        ];
        if self.accel == QtestAccel::Qtest {
            extra.extend(["-accel".into(), "qtest".into()]);
        }
        let kept = self.machine.args().len();
        self.machine.add_args(extra);
        let launched = self.machine.launch();
        self.machine.args_mut().truncate(kept);
        launched?;
        match QtestProtocol::from_unix_stream(ours, self.config.clone()) {
            Ok(qtest) => {
                self.qtest = Some(qtest);
                Ok(())
            }
            Err(err) => {
                // Only the nonblocking switch can fail here, and it already succeeded once.
                let source = match err {
                    QtestError::Io { source, .. } => source,
                    other => std::io::Error::other(other.to_string()),
                };
                if let Err(kill_err) = self.machine.kill() {
                    log::warn!("killing qemu after a qtest setup failure: {kill_err}");
                }
                Err(Error::Os {
                    what: "qtest socket setup",
                    source,
                })
            }
        }
    }

    /// The qtest channel of the running machine.
    ///
    /// [`super::Error::NotRunning`] before a launch and after the machine was ended through
    /// this wrapper; if QEMU exited by itself, the channel reports
    /// [`super::Error::Closed`] on use.
    pub fn qtest(&mut self) -> super::Result<&mut QtestProtocol> {
        self.qtest.as_mut().ok_or(QtestError::NotRunning)
    }

    /// Sends a raw qtest command (`qtest(cmd)` in QEMU's Python `qemu.machine`); returns the words after `OK`.
    pub fn qtest_command(&mut self, line: &str) -> super::Result<Vec<String>> {
        self.qtest()?.command(line)
    }

    /// Ends QEMU with the configured ladder and drops the qtest channel
    /// ([`Machine::shutdown`]).
    pub fn shutdown(&mut self) -> Result<ExitReport> {
        let result = self.machine.shutdown();
        self.qtest = None;
        result
    }

    /// SIGKILL, reap, clean up, and drop the qtest channel ([`Machine::kill`]).
    pub fn kill(&mut self) -> Result<ExitReport> {
        let result = self.machine.kill();
        self.qtest = None;
        result
    }

    /// Waits for QEMU to exit by itself, then drops the qtest channel ([`Machine::wait`]).
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitReport> {
        let result = self.machine.wait(timeout);
        self.qtest = None;
        result
    }

    /// The wrapped machine.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    /// The wrapped machine, mutable.
    pub fn machine_mut(&mut self) -> &mut Machine {
        &mut self.machine
    }

    /// Unwraps the machine (the qtest channel, if any, is closed).
    pub fn into_machine(self) -> Machine {
        self.machine
    }
}

impl Deref for QtestMachine {
    type Target = Machine;

    fn deref(&self) -> &Machine {
        &self.machine
    }
}

impl DerefMut for QtestMachine {
    fn deref_mut(&mut self) -> &mut Machine {
        &mut self.machine
    }
}
