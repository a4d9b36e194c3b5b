//! Launch, drive and tear down QEMU virtual machines: the `QEMUMachine` of this workspace.
//!
//! # Layering
//!
//! ```text
//! machine-cli ──> machine-core ──> qmp-client ──> qmp-proto
//!                      └─────────> console-socket
//! ```
//!
//! `machine-core` is the only crate that spawns, signals or reaps QEMU. It builds the command
//! line ([`MachineBuilder`]), spawns QEMU with an explicit fd allow-list, talks QMP through
//! [`qmp_client::Connection`], drains the serial console through [`console_socket::Console`],
//! and ends QEMU through a [`ShutdownLadder`], producing an [`ExitReport`]. The crates below
//! are re-exported ([`qmp_client`], [`qmp_proto`], [`console_socket`]) so users need only this
//! one.
//!
//! # Lifecycle
//!
//! 1. [`MachineBuilder`] collects the configuration; [`MachineBuilder::build`] makes a
//!    [`Machine`] (nothing runs yet).
//! 2. [`Machine::launch`] creates the monitor (a socketpair by default) and console
//!    socketpairs and an output pipe, spawns QEMU (a vfork-style `clone` that also returns a
//!    pidfd), closes QEMU's ends in this process at once, starts draining its stdout/stderr
//!    (into memory and, with a log dir, `{name}.log`) and its console, and completes the QMP
//!    handshake within the greeting deadline while watching the pidfd. If QEMU exits first,
//!    the wait ends at once and the launch fails with [`Error::LaunchFailed`] (exit status,
//!    command line, output), with everything rolled back. The private 0700 temp dir
//!    ([`Machine::temp_dir`]) is created on first use and removed after each exit.
//! 3. While it runs: [`Machine::cmd`] / [`Machine::qmp`], events ([`Machine::event`],
//!    [`Machine::events`], [`Machine::event_wait`], [`Machine::events_wait`]), the console
//!    ([`Machine::console`]), fd passing ([`Machine::send_fd_scm`]), output
//!    ([`Machine::log_tail`]), the guest agent ([`Machine::agent`], with
//!    [`MachineBuilder::guest_agent`]; [`linux::LinuxGuest`] is a guest that runs one).
//! 4. [`Machine::shutdown`] walks the ladder (default: `quit`, wait 30 s, SIGKILL and reap
//!    within 60 s), [`Machine::wait`] waits for a guest-initiated exit, [`Machine::kill`]
//!    kills. Each ends with the cleanup (temp dir, sockets, threads) and an
//!    [`ExitReport`]: who ended it, the exit status, the steps with their times, the last
//!    output, console lines and events. [`Machine::log`] has QEMU's output afterwards.
//! 5. The same `Machine` can be launched again. Dropping a running `Machine` kills and reaps
//!    QEMU and cleans up.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use machine_core::{MachineBuilder, Args};
//! use serde_json::json;
//!
//! let mut vm = MachineBuilder::new("qemu-system-x86_64")
//!     .machine_type("none")
//!     .args(["-accel", "tcg", "-nodefaults"])
//!     .build();
//! vm.launch()?;
//! let status = vm.cmd("query-status", ())?;
//! assert_eq!(status["status"], "running");
//! vm.cmd("stop", ())?;
//! vm.event_wait("STOP", None, Duration::from_secs(5))?;
//! // Underscores in argument names stay as they are with Args::exact.
//! let _ = vm.qmp("qom-list", Args::exact(json!({"path": "/machine"})))?;
//! let report = vm.shutdown()?;
//! println!("{report}");
//! # Ok::<(), machine_core::Error>(())
//! ```
//!
//! # Invariants
//!
//! - Invariant: only this crate spawns QEMU (in library code); every QEMU it spawns is owned
//!   by a guard inside a [`Machine`].
//! - Invariant: QEMU never outlives its `Machine`: dropping it kills and reaps QEMU; QEMU
//!   also gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies if our process dies. (The kernel
//!   sends that signal when the *thread* that launched QEMU exits: launch from a thread that
//!   lives as long as the `Machine`, or turn it off with
//!   [`MachineBuilder::parent_death_signal`].)
//! - Invariant: the child sees only the fds we list: stdin (`/dev/null`), stdout and stderr
//!   (our pipe), its monitor and console socketpair ends, and the fds given to
//!   [`MachineBuilder::pass_fd`], [`MachineBuilder::add_fd`] and [`Machine::pass_fd_once`].
//!   Every other fd is close-on-exec in the child, whatever its flags in this process.
//! - Invariant: a SHUTDOWN event alone never causes a SIGKILL; only an elapsed step of the
//!   ladder does.
//! - Invariant: values we put into QEMU option strings (paths, hosts, opaque strings) have
//!   their commas doubled, so they cannot add options.
//!
//! Exit supervision uses the pidfd registered in a `mio::Poll` beside the QMP socket: no
//! polling sleeps, no SIGCHLD handler, no PID reuse (signals go through `pidfd_send_signal`).
#![deny(missing_docs)]

mod agent;
mod argv;
mod config;
mod error;
mod fleet;
mod ladder;
mod machine;
mod output;
mod process;
mod report;
mod sys;

pub mod guest;
pub mod linux;
pub mod qtest;

pub use console_socket;
pub use qmp_client;
pub use qmp_proto;

pub use crate::agent::{AgentChannel, AGENT_CHARDEV};
pub use crate::argv::{escape_os_value, escape_value, split_options, CommandLine};
pub use crate::config::{ConsoleSettings, MachineBuilder, Monitor, DEFAULT_OUTPUT_CAPACITY};
pub use crate::error::{Error, Result};
pub use crate::fleet::{Fleet, MemberId, MemberState, Replies};
pub use crate::ladder::{
    ShutdownLadder, Step, StepOutcome, StepRecord, DEFAULT_GRACEFUL_TIMEOUT, DEFAULT_REAP_TIMEOUT,
};
pub use crate::machine::{prepare_socket_path, Args, Machine, LAUNCH_OUTPUT_LIMIT, UNIX_PATH_MAX};
pub use crate::process::{signal_name, ExitStatus};
pub use crate::report::{format_duration, EndedBy, ExitReport, ShutdownEvent};
