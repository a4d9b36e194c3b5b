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
//!    kills; each is a loop over the stepped ladder (see below). Each ends with the cleanup
//!    (temp dir, sockets, threads) and an
//!    [`ExitReport`]: who ended it, the exit status, the steps with their times, the last
//!    output, console lines and events. [`Machine::log`] has QEMU's output afterwards.
//! 5. The same `Machine` can be launched again. Dropping a running `Machine` kills and reaps
//!    QEMU and cleans up.
//!
//! # Stepping many machines from one thread
//!
//! Launch, running and the shutdown ladder are state machines. The blocking calls above are
//! loops over them; an owner with its own `mio::Poll` drives them directly, with no thread of
//! ours for QMP or exit supervision, so one thread can run hundreds of machines beside its
//! other sources:
//!
//! 1. [`Machine::launch_begin`] spawns QEMU and returns; [`Machine::register`] puts QEMU's
//!    pidfd, the QMP socket and QEMU's output pipe into the owner's registry under
//!    [`Tokens`] the owner chooses.
//! 2. On any event for those tokens, when [`Machine::next_deadline`] passes, and while
//!    [`Machine::wants_step`] is true, call [`Machine::step`]: it reads QMP (within a budget),
//!    advances the handshake, notices QEMU's exit and walks the ladder, never blocking. It
//!    returns the [`MachineState`] (`Launching`, `Running`, `Stopping { step, steps }`,
//!    `Exited`; `Idle` after a failed launch, whose error `step` returns).
//! 3. While running: [`Machine::submit`] sends a command without waiting,
//!    [`Machine::take_reply`] picks its reply up later, [`Machine::take_event`] takes a
//!    matching event that has arrived.
//! 4. [`Machine::shutdown_begin`] starts a [`ShutdownLadder`] (its first request or signal
//!    goes out at once); `step` walks it to [`MachineState::Exited`], after which
//!    [`Machine::exit_report`] has the report (or `step` returned the
//!    [`Error::AbnormalShutdown`] the blocking call would).
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use machine_core::{Machine, MachineBuilder, MachineState, ShutdownLadder, Tokens};
//! use mio::{Events, Poll, Token};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut poll = Poll::new()?;
//! let mut machines: Vec<Machine> = (0..3)
//!     .map(|_| MachineBuilder::new("qemu-system-x86_64").machine_type("none").build())
//!     .collect();
//! for (i, m) in machines.iter_mut().enumerate() {
//!     m.launch_begin()?;
//!     let (exit, qmp, output) = (Token(3 * i), Token(3 * i + 1), Token(3 * i + 2));
//!     m.register(poll.registry(), Tokens { exit, qmp, output })?;
//! }
//! let mut events = Events::with_capacity(64);
//! let mut stopping = false;
//! while machines.iter().any(|m| m.state() != MachineState::Exited) {
//!     let next = machines.iter().filter_map(Machine::next_deadline).min();
//!     let busy = machines.iter_mut().any(Machine::wants_step);
//!     let timeout = if busy { Some(Duration::ZERO) } else {
//!         next.map(|d| d.saturating_duration_since(Instant::now()))
//!     };
//!     poll.poll(&mut events, timeout)?;
//!     // Stepping a machine with nothing to do is cheap: step them all.
//!     for m in &mut machines {
//!         m.step()?;
//!     }
//!     if !stopping && machines.iter().all(|m| m.state() == MachineState::Running) {
//!         stopping = true;
//!         for m in &mut machines {
//!             m.shutdown_begin(&ShutdownLadder::default())?;
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! No thread is started for QMP, exit supervision or QEMU's output of a stepped machine. A
//! [`console_socket::Console`] (when the machine has one) keeps its drain thread unless the
//! owner takes its source onto the poll with [`Machine::register_console`]: then `step`
//! drains it too and no thread of the machine's runs (waits on that console from the
//! polling thread must use a zero timeout); [`Machine::deregister`] gives it its thread
//! back. [`Fleet`] leaves its members' consoles on their threads. (The blocking
//! [`Machine::launch`] drains the output on a thread of its own, `{name}-output`.) Every
//! monitor kind is stepped: with a unix or TCP monitor (QEMU connects to us) the listener
//! stands in for the connection under the `qmp` token until QEMU connects, and `step` accepts
//! it. The blocking [`Machine::launch`] is the same spawn and a loop over the same launch
//! step.
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
mod share;
mod sys;

pub mod guest;
pub mod linux;
pub mod qtest;

pub use console_socket;
/// The `mio` whose `Registry` and `Token` the stepping API takes ([`Machine::register`]).
pub use mio;
pub use qmp_client;
pub use qmp_proto;

pub use crate::agent::{AgentChannel, AGENT_CHARDEV};
pub use crate::argv::{escape_os_value, escape_value, split_options, CommandLine};
pub use crate::config::{ConsoleSettings, MachineBuilder, Monitor, DEFAULT_OUTPUT_CAPACITY};
pub use crate::error::{Error, Result};
pub use crate::fleet::{Fleet, MemberId, Replies};
pub use crate::ladder::{
    ShutdownLadder, Step, StepOutcome, StepRecord, DEFAULT_GRACEFUL_TIMEOUT, DEFAULT_REAP_TIMEOUT,
};
pub use crate::machine::{
    prepare_socket_path, Args, Machine, MachineState, Tokens, LAUNCH_OUTPUT_LIMIT, UNIX_PATH_MAX,
};
pub use crate::process::{signal_name, ExitStatus};
pub use crate::report::{format_duration, EndedBy, ExitReport, ShutdownEvent};
pub use crate::share::SharingInfo;
/// The signal type of [`Step::Signal`] (nix's), so callers need no nix of their own.
pub use nix::sys::signal::Signal;
