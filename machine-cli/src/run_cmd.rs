//! `qemu-machine run`: launch a VM through `machine-core` and stay attached until it ends.
//!
//! With no QEMU arguments it boots the built-in tiny guest (`machine_core::guest`) on q35 with
//! qboot under TCG. The console goes to stdout as it arrives; on a terminal, what you type goes
//! to the console line by line. Lifecycle lines and QMP events go to stderr in human form, or,
//! with `--json`, everything (console text included) goes to stdout as JSON Lines with a
//! `type` field: `launched`, `listening`, `sharing`, `console`, `banner`, `event`, `stopping`,
//! `exit`. With `--share-qmp PATH`, other QMP clients attach to our own monitor at PATH.
//!
//! Stopping is machine-core's shutdown ladder, stepped from this loop (`Machine::step`), so
//! the console and events keep flowing while it runs: `system_powerdown` (the guest may power
//! off), then `quit`, each step with `--shutdown-timeout`, then SIGTERM (5 s), then SIGKILL.
//! A first Ctrl-C (or SIGTERM, SIGHUP, `--timeout`, `--exit-after-banner`) starts it; a
//! second one, or Ctrl-\\ (SIGQUIT), kills QEMU at once.
//!
//! The loop waits in one `mio::Poll` and wakes only when something happened or is due: QEMU's
//! pidfd, its QMP monitor and its console (taken off the console's drain thread with
//! `Machine::register_console`, so `Machine::step` drains it here), a waker the signal and
//! stdin threads poke after each message, and the deadlines (the ladder's next step,
//! `--timeout`, a quiet console for held lines and `--send` answers). No fixed tick.
//!
//! With `--exit-after-banner` and `--send` lines, the ladder starts only once the guest is
//! quiet again (the tiny guest's prompt after each line, or a short silence on the console), so
//! the lines' output is not lost.
//!
//! On stderr, lifecycle and event lines wait for the console to reach the end of a line (or
//! to be silent for a moment, as at a prompt), so they never cut the guest's text in two.
//!
//! The exit status says how the VM ended, decided by QEMU's exit status first
//! ([`ExitReport::clean`]): 0 when it shut down cleanly (our request, a shared client's allowed
//! `quit`, or the guest powering off), QEMU's own code when it exited by itself with one, 128+S when a signal S we did not
//! send ended it, 137 when we had to kill it, 1 for another abnormal end (a guest reset with
//! `-no-reboot`, a panic). A guest that writes V to `isa-debug-exit` makes QEMU exit with
//! `(V << 1) | 1`; `run` returns that code unchanged (the tiny guest's `exit 3` gives 7), so no
//! guest write can look like success, and the last line shows both numbers. A signal that
//! arrives while QEMU is still starting ends the launch at once (QEMU killed, status 130).
//!
//! When QEMU has ended, one line says how; after an abnormal end (or with `--report full`) the
//! full report follows: ladder steps, last events, QEMU's output, the console's last lines and
//! the command line.

use std::cell::{Cell, RefCell};
use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};
use machine_core::guest::{self, GuestMachine};
use machine_core::mio::{Events, Poll, Token, Waker};
use machine_core::{
    format_duration, EndedBy, ExitReport, Machine, MachineBuilder, MachineState, ShutdownLadder,
    Step, Tokens,
};
use serde_json::{json, Value};

use crate::address::Address;
use crate::args::{Accel, ReportMode, RunArgs};
use crate::error::{Error, Result};
use crate::events_cmd;
use crate::output;
use crate::sys::signals::{self, Received};
use crate::sys::tty;

/// The loop's poll: the signal and stdin threads' waker, and the machine's sources.
const WAKE: Token = Token(0);
const TOKENS: Tokens = Tokens {
    exit: Token(1),
    qmp: Token(2),
    output: Token(3),
};
const CONSOLE: Token = Token(4);

/// How long the SIGTERM step of the stop ladder waits before SIGKILL.
const SIGTERM_TIMEOUT: Duration = Duration::from_secs(5);

/// Exit status when we had to SIGKILL QEMU (128 + 9, as a shell reports it).
const EXIT_KILLED: u8 = 137;

/// A console silent this long counts as quiet: held lines are printed, and `--send` lines of
/// a guest without a known prompt count as answered.
const QUIET: Duration = Duration::from_millis(300);

/// What the helper threads tell the loop.
enum Msg {
    Signal(Received),
    Stdin(Vec<u8>),
}

/// Where the stop ladder stands: the step last announced, once machine-core walks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stopping {
    /// Not stopping.
    No,
    /// The ladder runs (stepped from this loop); this step was announced last.
    Step(usize),
}

/// Prints lifecycle lines: human lines on stderr, or JSON Lines on stdout.
struct Reporter {
    json: bool,
    start: Instant,
    /// The console's last byte was not a newline: a human line must start on a new line.
    mid_line: Cell<bool>,
    /// When the console last printed something.
    console_at: Cell<Instant>,
    /// Human lines held back until the console reaches the end of a line or goes quiet.
    held: RefCell<Vec<String>>,
    /// Writing to stdout failed (the terminal hung up, the pipe's reader left): output stops
    /// and the VM is shut down gracefully rather than killed by an error.
    broken: Cell<bool>,
}

impl Reporter {
    fn new(json: bool) -> Reporter {
        let now = Instant::now();
        Reporter {
            json,
            start: now,
            mid_line: Cell::new(false),
            console_at: Cell::new(now),
            held: RefCell::new(Vec::new()),
            broken: Cell::new(false),
        }
    }

    /// Notes a failed write to stdout instead of failing the run (see `broken`).
    fn record(&self, written: Result<()>) -> Result<()> {
        if let Err(error) = written {
            if !self.broken.replace(true) {
                debug!("output stopped: {error}");
            }
        }
        Ok(())
    }

    /// Whether stdout has failed.
    fn broken(&self) -> bool {
        self.broken.get()
    }

    /// A lifecycle line: `text` for people, `object` (plus `type` and `ms`) for `--json`.
    fn line(&self, kind: &str, text: &str, mut object: Value) -> Result<()> {
        let elapsed = self.start.elapsed();
        if self.json {
            if let Value::Object(map) = &mut object {
                map.insert("type".to_string(), Value::from(kind));
                map.insert("ms".to_string(), Value::from(elapsed.as_millis() as u64));
            }
            self.record(output::emit(&object.to_string()))
        } else {
            self.human(format!(
                "[qemu-machine +{}] {text}",
                format_duration(elapsed)
            ));
            Ok(())
        }
    }

    /// Prints a human line on stderr at a line boundary of the console: held while the
    /// console is in the middle of a line and still talking, printed at once otherwise.
    fn human(&self, text: String) {
        if self.mid_line.get() && self.console_at.get().elapsed() < QUIET {
            self.held.borrow_mut().push(text);
        } else {
            // Lines held before this one go first.
            self.release(true);
            self.new_line();
            output::note(&text);
        }
    }

    /// Prints the held lines once the console is at a line end or has gone quiet.
    fn release(&self, force: bool) {
        if self.held.borrow().is_empty() {
            return;
        }
        if force || !self.mid_line.get() || self.console_at.get().elapsed() >= QUIET {
            self.new_line();
            for text in self.held.take() {
                output::note(&text);
            }
        }
    }

    /// When held lines are due to be printed although the console stays mid-line (it has
    /// gone quiet): the loop must wake by then.
    fn release_due(&self) -> Option<Instant> {
        (!self.held.borrow().is_empty() && self.mid_line.get())
            .then(|| self.console_at.get() + QUIET)
    }

    /// Ends a console line left open, so that a human line does not start mid-line.
    fn new_line(&self) {
        if self.mid_line.replace(false) {
            output::note("");
        }
    }

    fn console(&self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() || self.broken() {
            return Ok(());
        }
        self.console_at.set(Instant::now());
        if self.json {
            let text = String::from_utf8_lossy(bytes);
            return self.record(output::emit(
                &json!({"type": "console", "text": text}).to_string(),
            ));
        }
        // Held lines go out at the first line boundary in these bytes.
        let cut = match bytes.iter().position(|b| *b == b'\n') {
            Some(at) if !self.held.borrow().is_empty() => at + 1,
            _ => bytes.len(),
        };
        let (lines, rest) = bytes.split_at(cut);
        self.write_console(lines)?;
        if lines.ends_with(b"\n") {
            self.mid_line.set(false);
            self.release(true);
        }
        self.write_console(rest)
    }

    /// Writes console bytes to stdout as they are.
    fn write_console(&self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.mid_line.set(!bytes.ends_with(b"\n"));
        let mut stdout = std::io::stdout().lock();
        self.record(
            stdout
                .write_all(bytes)
                .and_then(|()| stdout.flush())
                .map_err(|source| Error::Io {
                    what: "writing to stdout",
                    source,
                }),
        )
    }

    fn event(&self, event: &machine_core::qmp_proto::Event) -> Result<()> {
        let view = events_cmd::view(event);
        if self.json {
            let mut object = view.to_value();
            if let Value::Object(map) = &mut object {
                map.insert("type".to_string(), Value::from("event"));
            }
            self.record(output::emit(&object.to_string()))
        } else {
            self.human(format!("[qemu-machine event] {}", view.human_line()));
            Ok(())
        }
    }
}

/// Counts the appearances of a text in a byte stream that arrives in pieces.
struct Watch {
    needle: Vec<u8>,
    /// The end of the stream that may still hold the start of an appearance.
    tail: Vec<u8>,
}

impl Watch {
    fn new(needle: &str) -> Watch {
        Watch {
            needle: needle.as_bytes().to_vec(),
            tail: Vec::new(),
        }
    }

    /// Feeds the next piece of the stream; returns how many appearances end in it.
    fn feed(&mut self, bytes: &[u8]) -> usize {
        if self.needle.is_empty() {
            return 0;
        }
        self.tail.extend_from_slice(bytes);
        let mut found = 0;
        let mut from = 0;
        while let Some(at) = self.tail[from..]
            .windows(self.needle.len())
            .position(|w| w == self.needle.as_slice())
        {
            found += 1;
            from += at + self.needle.len();
        }
        let keep = self.needle.len() - 1;
        let cut = from.max(self.tail.len().saturating_sub(keep));
        self.tail.drain(..cut);
        found
    }
}

/// Runs `run`; returns the exit status derived from how the VM ended.
pub fn run(args: RunArgs) -> Result<u8> {
    let reporter = Reporter::new(args.json);
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut poll = Poll::new().map_err(|source| Error::Io {
        what: "creating the event loop's poll",
        source,
    })?;
    let waker = Arc::new(
        Waker::new(poll.registry(), WAKE).map_err(|source| Error::Io {
            what: "creating the event loop's waker",
            source,
        })?,
    );
    // First, before machine-core starts any thread: every thread must inherit the mask.
    let signals = signals::install(tx.clone(), Msg::Signal, Some(Arc::clone(&waker)))?;

    if find_program(&args.qemu).is_none() {
        return Err(Error::QemuNotFound {
            path: args.qemu.clone(),
        });
    }
    let linux = match args.linux {
        true => Some(
            machine_core::linux::LinuxGuest::ensure(&args.linux_cache)
                .map_err(|source| Error::LinuxGuest { source })?,
        ),
        false => None,
    };
    let tiny = args.qemu_args.is_empty() && linux.is_none();
    let listen: Vec<Address> = args.qmp_listen.iter().map(|a| Address::parse(a)).collect();
    // QEMU unlinks whatever is at a listening unix path before it binds: a user's file there
    // would be lost. Only a stale socket may go.
    for address in &listen {
        match address {
            Address::Unix(path) => {
                machine_core::prepare_socket_path(path).map_err(|source| Error::ListenPath {
                    path: path.clone(),
                    source: Box::new(source),
                })?;
            }
            Address::Tcp(addr) if !args.allow_remote_qmp && !loopback_only(addr) => {
                return Err(Error::RemoteQmp {
                    address: addr.clone(),
                });
            }
            Address::Tcp(_) => {}
        }
    }
    let tiny_guest = if tiny {
        Some(match args.machine.as_deref() {
            None | Some("q35") => GuestMachine::Q35,
            Some("pc") => GuestMachine::Pc,
            Some(other) => {
                return Err(Error::TinyGuestMachine {
                    machine: other.to_string(),
                })
            }
        })
    } else {
        None
    };
    let mut machine = build(&args, &listen, linux.as_ref(), tiny_guest)?;

    // A signal during the handshake ends the launch at once (QEMU is killed).
    match machine.launch_with_abort(signals.wakeup()) {
        Ok(()) => {}
        Err(machine_core::Error::LaunchFailed { cause, .. })
            if matches!(*cause, machine_core::Error::LaunchAborted) =>
        {
            let signal = match rx.try_recv() {
                Ok(Msg::Signal(signal)) => signal_text(signal),
                _ => "a signal",
            };
            return Err(Error::Interrupted { signal });
        }
        Err(source) => {
            return Err(Error::Launch {
                binary: args.qemu.clone(),
                source,
            })
        }
    }
    // None when QEMU already exited right after the handshake (the exit report follows).
    let pid = machine.pid();
    let command = machine
        .command_line()
        .map(|c| c.to_string())
        .unwrap_or_default();
    let who = pid.map_or_else(
        || "qemu (already exited)".to_string(),
        |p| format!("qemu pid {p}"),
    );
    reporter.line(
        "launched",
        &format!("launched {who}: {command}"),
        json!({"pid": pid, "command": command}),
    )?;
    for address in &listen {
        reporter.line(
            "listening",
            &format!("QMP clients can connect to {address}"),
            json!({"qmp": address.to_string()}),
        )?;
    }
    if let Some(shared) = machine.sharing() {
        let tcp = shared
            .tcp
            .map(|a| format!(" and tcp {a}"))
            .unwrap_or_default();
        reporter.line(
            "sharing",
            &format!(
                "QMP clients can attach to our monitor at {}{tcp}",
                shared.path.display()
            ),
            json!({"shared_qmp": shared.path, "shared_qmp_tcp": shared.tcp.map(|a| a.to_string())}),
        )?;
    }
    // QEMU's pidfd, monitor and console on our poll. A QEMU that already exited has nothing
    // to register: the loop's first step collects it.
    if machine.is_running() {
        machine
            .register(poll.registry(), TOKENS)
            .and_then(|()| machine.register_console(poll.registry(), CONSOLE))
            .map_err(|source| Error::Machine {
                what: "putting qemu on the event loop",
                source,
            })?;
    }
    // On a terminal, keys go to the guest as typed (the guest echoes them); restored on return.
    let keys = tty::KeysToGuest::enable()?;
    if keys.is_some() {
        forward_stdin(tx, waker)?;
    } else {
        drop(tx);
    }

    let banner = args
        .banner
        .clone()
        .or_else(|| tiny.then(|| guest::BANNER.to_string()))
        .or_else(|| {
            linux
                .is_some()
                .then(|| machine_core::linux::READY_LINE.to_string())
        });
    let prompt = tiny.then_some(guest::PROMPT);
    let outcome = attach(
        &mut machine,
        &args,
        &reporter,
        (&mut poll, &rx),
        banner.as_deref(),
        prompt,
    );
    let result = match outcome {
        Ok(ended) => finish(&mut machine, &reporter, ended, args.report),
        Err(error) => {
            // Never leave QEMU behind, whatever failed in the loop.
            if machine.is_running() {
                if let Err(kill) = machine.kill() {
                    warn!("killing qemu after an error: {kill}");
                }
            }
            Err(error)
        }
    };
    for address in &listen {
        if let Address::Unix(path) = address {
            remove_stale_socket(path);
        }
    }
    if let Some(path) = &args.agent_listen {
        remove_stale_socket(path);
    }
    result
}

/// The machine as configured by the options (the tiny guest's arguments come later; the Linux
/// guest's, with its accelerator, machine type and agent channel, come here).
fn build(
    args: &RunArgs,
    listen: &[Address],
    linux: Option<&machine_core::linux::LinuxGuest>,
    tiny_guest: Option<GuestMachine>,
) -> Result<Machine> {
    let mut builder = MachineBuilder::new(&args.qemu);
    if let Some(guest_machine) = tiny_guest {
        // The kernel is written at launch; the guest's arguments (with `-nodefaults`: no NIC
        // option ROM or default devices to slow the boot) come last.
        builder.tiny_guest(guest_machine);
    }
    // Ctrl-C goes to the terminal's whole foreground process group; QEMU must not get it (it
    // would quit at once), so on a terminal it runs in a session of its own and we run the
    // ladder.
    builder.new_session(attached_to_terminal());
    builder
        .greeting_timeout(args.launch_timeout)
        .command_timeout(args.shutdown_timeout)
        .console();
    if let Some(path) = &args.console_log {
        builder.console_log(path);
    }
    if let Some((address, config)) = args.share.sharing() {
        builder.share_qmp(address, config);
    }
    if !args.qemu_args.is_empty() {
        if let Some(machine) = &args.machine {
            builder.machine_type(machine);
        }
    }
    match (linux, &args.agent_listen) {
        (Some(guest), None) => {
            guest.configure(&mut builder);
        }
        (Some(guest), Some(path)) => {
            // The agent on a socket path instead of the socketpair, for `qemu-machine ga`.
            machine_core::prepare_socket_path(path).map_err(|source| Error::ListenPath {
                path: path.clone(),
                source: Box::new(source),
            })?;
            let mut chardev = OsString::from("socket,id=qga0,server=on,wait=off,path=");
            chardev.push(machine_core::escape_os_value(path.as_os_str()));
            builder.machine_type("q35").args(guest.qemu_args()).args([
                OsString::from("-chardev"),
                chardev,
                "-device".into(),
                "isa-serial,chardev=qga0".into(),
            ]);
        }
        (None, _) => {
            builder.args(accel_args(args.accel));
        }
    }
    if let Some(memory) = &args.memory {
        builder.args(["-m", memory.as_str()]);
    }
    for address in listen {
        builder.args(["-qmp".into(), qmp_listen_option(address)?]);
    }
    builder.args(args.qemu_args.iter().cloned());
    Ok(builder.build())
}

/// Whether a terminal can send us signals (Ctrl-C, Ctrl-\\) through our process group.
fn attached_to_terminal() -> bool {
    std::io::stdin().is_terminal()
        || std::io::stdout().is_terminal()
        || std::io::stderr().is_terminal()
}

/// `name` as found on `$PATH` (an executable regular file), or as given if it has a `/`.
pub fn find_program(name: impl AsRef<Path>) -> Option<PathBuf> {
    let name = name.as_ref();
    let executable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.components().count() > 1 {
        return executable(name).then(|| name.to_path_buf());
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| executable(path))
}

/// `-accel` arguments: `auto` tries KVM and falls back to TCG (QEMU does the fallback).
fn accel_args(accel: Accel) -> Vec<&'static str> {
    match accel {
        Accel::Tcg => vec!["-accel", "tcg"],
        Accel::Kvm => vec!["-accel", "kvm"],
        Accel::Auto => vec!["-accel", "kvm", "-accel", "tcg"],
    }
}

/// Whether every address `host:port` names is loopback (a name that does not resolve counts
/// as not loopback; QEMU would fail on it anyway).
fn loopback_only(host_port: &str) -> bool {
    use std::net::ToSocketAddrs;
    match host_port.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// The `-qmp` value for an extra QMP server socket, with the path or host escaped so it cannot
/// add options.
fn qmp_listen_option(address: &Address) -> Result<OsString> {
    match address {
        Address::Unix(path) => {
            let len = path.as_os_str().len();
            if len > machine_core::UNIX_PATH_MAX {
                return Err(Error::ListenPathTooLong {
                    path: path.clone(),
                    len,
                    limit: machine_core::UNIX_PATH_MAX,
                });
            }
            let mut value = OsString::from("unix:");
            value.push(machine_core::escape_os_value(path.as_os_str()));
            value.push(",server=on,wait=off");
            Ok(value)
        }
        Address::Tcp(addr) => Ok(format!(
            "tcp:{},server=on,wait=off",
            machine_core::escape_value(addr)
        )
        .into()),
    }
}

/// Removes the `--qmp-listen` socket file QEMU may leave behind (only if it is a socket).
fn remove_stale_socket(path: &Path) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if let Err(error) = std::fs::remove_file(path) {
                debug!("removing {}: {error}", path.display());
            }
        }
    }
}

/// Forwards what is typed on the terminal to the loop, a read at a time (whole lines, as the
/// terminal stays in its normal line mode so Ctrl-C still raises SIGINT), waking its poll.
fn forward_stdin(tx: mpsc::Sender<Msg>, waker: Arc<Waker>) -> Result<()> {
    thread::Builder::new()
        .name("stdin".to_string())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 4096];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(Msg::Stdin(buf[..n].to_vec())).is_err() {
                            return;
                        }
                        if let Err(error) = waker.wake() {
                            debug!("waking the loop for typed input: {error}");
                        }
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|source| Error::Io {
            what: "starting the stdin thread",
            source,
        })
}

/// How the loop ended.
enum Ended {
    /// QEMU exited (by itself or after our ladder steps); collect the report.
    Exited,
    /// A second Ctrl-C: kill now.
    Kill,
}

/// The attached loop: console, events, signals, stdin, the banner and the stop ladder.
/// `prompt` is the guest's prompt when known: it tells when a `--send` line was answered.
fn attach(
    machine: &mut Machine,
    args: &RunArgs,
    reporter: &Reporter,
    (poll, rx): (&mut Poll, &mpsc::Receiver<Msg>),
    banner: Option<&str>,
    prompt: Option<&str>,
) -> Result<Ended> {
    let mut events = Events::with_capacity(16);
    let step = args.shutdown_timeout;
    let stop_at = args.timeout.map(|t| Instant::now() + t);
    let mut banner_seen = banner.is_none();
    let mut banner_watch = Watch::new(banner.unwrap_or_default());
    let mut prompt_watch = Watch::new(prompt.unwrap_or_default());
    let mut prompts = 0;
    // With --exit-after-banner and --send lines: when the lines were sent (the ladder waits
    // until the guest has answered them).
    let mut answering: Option<Instant> = None;
    let mut sent_lines = false;
    let mut stopping = Stopping::No;
    let mut events_open = true;
    loop {
        // The machine: its console, QMP, exit and the ladder. An error here is the ladder
        // ending badly or QEMU gone; the exit check and `finish` report it.
        if let Err(error) = machine.step() {
            debug!("stepping qemu: {error}");
        }

        // Console output.
        let bytes = machine
            .console()
            .map(|c| c.read_available())
            .unwrap_or_default();
        reporter.console(&bytes)?;
        reporter.release(false);
        prompts += prompt_watch.feed(&bytes);
        if let (false, Some(banner)) = (banner_seen, banner) {
            if banner_watch.feed(&bytes) > 0 {
                banner_seen = true;
                reporter.line(
                    "banner",
                    &format!("banner seen: {banner:?}"),
                    json!({"banner": banner}),
                )?;
            }
        }
        if banner_seen && !sent_lines {
            sent_lines = true;
            for line in &args.send {
                if let Ok(console) = machine.console() {
                    console.send_line(line).map_err(|source| Error::Console {
                        what: "sending a --send line",
                        source,
                    })?;
                }
            }
            if args.exit_after_banner && stopping == Stopping::No {
                if args.send.is_empty() {
                    stopping = begin_stop(machine, reporter, "the banner appeared", None, step)?;
                } else {
                    answering = Some(Instant::now());
                }
            }
        }
        // The tiny guest prints its prompt once after the banner and once after each line.
        if let (Some(sent), Stopping::No) = (answering, stopping) {
            let quiet_since = reporter.console_at.get().max(sent);
            let answered = match prompt {
                Some(_) => prompts > args.send.len(),
                None => false,
            };
            if answered || quiet_since.elapsed() >= QUIET {
                answering = None;
                stopping = begin_stop(
                    machine,
                    reporter,
                    "the --send lines were answered",
                    None,
                    step,
                )?;
            }
        }

        // QMP events (an error here means the connection is gone: QEMU is ending).
        while events_open {
            match machine.event(Duration::ZERO) {
                Ok(Some(event)) => reporter.event(&event)?,
                Ok(None) => break,
                Err(error) => {
                    debug!("event stream ended: {error}");
                    events_open = false;
                }
            }
        }

        if !machine.is_running() {
            return Ok(Ended::Exited);
        }

        // The ladder's deadlines, the overall timeout, and an output that went away.
        let now = Instant::now();
        match stopping {
            Stopping::No if reporter.broken() => {
                stopping = begin_stop(machine, reporter, "output closed", None, step)?;
            }
            Stopping::No if stop_at.is_some_and(|at| now >= at) => {
                stopping = begin_stop(machine, reporter, "--timeout elapsed", None, step)?;
            }
            Stopping::Step(announced) => {
                stopping = announce_steps(machine.state(), reporter, announced, step)?;
            }
            _ => {}
        }

        // Signals and typed input.
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Signal(signal) => {
                    let what = signal_text(signal);
                    if stopping == Stopping::No && signal != Received::Quit {
                        stopping = begin_stop(machine, reporter, what, Some(what), step)?;
                    } else {
                        reporter.line(
                            "stopping",
                            &if stopping == Stopping::No {
                                format!("{what}: killing qemu")
                            } else {
                                format!("{what} again: killing qemu")
                            },
                            json!({"step": "kill", "reason": what}),
                        )?;
                        return Ok(Ended::Kill);
                    }
                }
                Msg::Stdin(bytes) => {
                    if let Ok(console) = machine.console() {
                        if let Err(error) = console.send(&bytes) {
                            warn!("typed input not sent to the console: {error}");
                        }
                    }
                }
            }
        }

        // A ladder begun above may already be over (a QEMU that exits at once is collected
        // inside `shutdown_begin`): its sources are gone, nothing would wake the poll.
        if !machine.is_running() {
            continue;
        }

        // Wait for the next event or deadline: QEMU (exit, QMP, console), a signal or typed
        // input (the waker), the ladder's next step, --timeout, a quiet console.
        let quiet = answering
            .filter(|_| stopping == Stopping::No)
            .map(|sent| reporter.console_at.get().max(sent) + QUIET);
        let timed = stop_at.filter(|_| stopping == Stopping::No);
        let wake_at = [
            machine.next_deadline(),
            timed,
            quiet,
            reporter.release_due(),
        ]
        .into_iter()
        .flatten()
        .min();
        let timeout = if machine.wants_step() {
            Some(Duration::ZERO)
        } else {
            wake_at.map(|at| at.saturating_duration_since(Instant::now()))
        };
        if let Err(source) = poll.poll(&mut events, timeout) {
            if source.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::Io {
                    what: "waiting in the event loop",
                    source,
                });
            }
        }
    }
}

/// How a received signal is named in messages.
fn signal_text(signal: Received) -> &'static str {
    match signal {
        Received::Interrupt => "Ctrl-C",
        Received::Terminate => "SIGTERM",
        Received::HangUp => "SIGHUP",
        Received::Quit => "SIGQUIT",
    }
}

/// First rung: `system_powerdown`. A machine that refuses it goes straight to `quit`.
/// `signal` names the signal that asked for the stop, if one did: the same one again kills.
fn begin_stop(
    machine: &mut Machine,
    reporter: &Reporter,
    why: &str,
    signal: Option<&str>,
    step: Duration,
) -> Result<Stopping> {
    let kill = match signal {
        Some("Ctrl-C") | None => "Ctrl-C kills at once".to_string(),
        Some(signal) => format!("another {signal} or Ctrl-C kills at once"),
    };
    reporter.line(
        "stopping",
        &format!(
            "{why}: system_powerdown (up to {}; {kill})",
            format_duration(step)
        ),
        json!({"step": "system_powerdown", "reason": why}),
    )?;
    machine
        .shutdown_begin(&stop_ladder(step))
        .map_err(|source| Error::Machine {
            what: "starting the shutdown",
            source,
        })?;
    Ok(Stopping::Step(0))
}

/// The stop ladder: `system_powerdown` (the guest may power off), `quit`, each for `step`,
/// then SIGTERM for 5 s, then SIGKILL. machine-core walks it ([`Machine::step`]); a machine
/// that refuses `system_powerdown` goes on to `quit` at once.
fn stop_ladder(step: Duration) -> ShutdownLadder {
    ShutdownLadder::new([
        Step::Powerdown { timeout: step },
        Step::Quit { timeout: step },
        Step::Signal {
            signal: machine_core::Signal::SIGTERM,
            timeout: SIGTERM_TIMEOUT,
        },
    ])
}

/// Announces each ladder step machine-core entered since the last one announced (the loop's
/// `Machine::step` walks the ladder).
fn announce_steps(
    state: MachineState,
    reporter: &Reporter,
    announced: usize,
    step: Duration,
) -> Result<Stopping> {
    let MachineState::Stopping { step: now, .. } = state else {
        return Ok(Stopping::Step(announced));
    };
    for entered in announced + 1..=now {
        match entered {
            1 => reporter.line(
                "stopping",
                &format!("quit (up to {})", format_duration(step)),
                json!({"step": "quit"}),
            )?,
            2 => reporter.line(
                "stopping",
                "SIGTERM (then SIGKILL)",
                json!({"step": "sigterm"}),
            )?,
            _ => reporter.line("stopping", "SIGKILL", json!({"step": "kill"}))?,
        }
    }
    Ok(Stopping::Step(now.max(announced)))
}

/// Collects the exit report (running the last rungs when needed), prints what is left of the
/// console and events, then the report; returns the exit status.
fn finish(
    machine: &mut Machine,
    reporter: &Reporter,
    ended: Ended,
    mode: ReportMode,
) -> Result<u8> {
    let ladder = match ended {
        // Already exited: this only reaps and cleans up.
        Ended::Exited => ShutdownLadder::wait(Duration::from_secs(5)),
        Ended::Kill => ShutdownLadder::hard(),
    };
    let (report, abnormal) = match machine.shutdown_with(&ladder) {
        Ok(report) => (report, None),
        Err(machine_core::Error::AbnormalShutdown { report, cause }) => (*report, Some(cause)),
        Err(source) => {
            return Err(Error::Machine {
                what: "ending qemu",
                source,
            })
        }
    };
    // What arrived between the loop's last turn and the exit.
    if let Ok(console) = machine.console() {
        let rest = console.read_available();
        reporter.console(&rest)?;
    }
    while let Ok(Some(event)) = machine.event(Duration::ZERO) {
        reporter.event(&event)?;
    }
    if let Some(cause) = &abnormal {
        warn!("qemu had to be killed: {cause}");
    }
    reporter.release(true);
    let code = exit_code(&report);
    print_report(reporter, &report, code, mode)?;
    Ok(code)
}

/// The last word: one line saying how QEMU ended, then the full report when `mode` asks for
/// it (by default after an abnormal end only).
fn print_report(
    reporter: &Reporter,
    report: &ExitReport,
    code: u8,
    mode: ReportMode,
) -> Result<()> {
    if reporter.json {
        let steps: Vec<Value> = report
            .steps
            .iter()
            .map(|s| {
                json!({
                    "step": s.step.to_string(),
                    "started_ms": s.started.as_millis() as u64,
                    "elapsed_ms": s.elapsed.as_millis() as u64,
                    "outcome": format!("{:?}", s.outcome),
                })
            })
            .collect();
        reporter.line(
            "exit",
            "",
            json!({
                "ended_by": report.ended_by.to_string(),
                "summary": report.summary(),
                "clean": report.clean(),
                "status": report.status.to_string(),
                "exit_code": code,
                "uptime_ms": report.uptime.as_millis() as u64,
                "steps": steps,
                "shutdown_reason": report.shutdown_event.as_ref().map(|s| s.reason.clone()),
                "output_tail": report.output_tail,
            }),
        )
    } else {
        let full = match mode {
            ReportMode::None => return Ok(()),
            ReportMode::Short => false,
            ReportMode::Full => true,
            ReportMode::Auto => !report.clean(),
        };
        reporter.line("exit", &report.summary(), Value::Null)?;
        if full {
            // The summary is the report's first line; the details follow it.
            for line in report.to_string().lines().skip(1) {
                output::note(line);
            }
        }
        Ok(())
    }
}

/// The exit status for how the VM ended (see the module docs): the library decides what is
/// clean, this maps the rest to numbers.
pub fn exit_code(report: &ExitReport) -> u8 {
    if report.clean() {
        return 0;
    }
    match (&report.ended_by, report.status.code()) {
        (EndedBy::Kill, _) => EXIT_KILLED,
        (EndedBy::ExternalSignal { signal } | EndedBy::Crash { signal }, _) => {
            u8::try_from(128 + signal).unwrap_or(1)
        }
        (_, Some(code)) => u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_choices() {
        assert_eq!(accel_args(Accel::Tcg), ["-accel", "tcg"]);
        assert_eq!(accel_args(Accel::Auto), ["-accel", "kvm", "-accel", "tcg"]);
    }

    #[test]
    fn listen_options_are_escaped() {
        assert_eq!(
            qmp_listen_option(&Address::Unix("/tmp/a,wait=on".into())).unwrap(),
            "unix:/tmp/a,,wait=on,server=on,wait=off"
        );
        assert_eq!(
            qmp_listen_option(&Address::Tcp("127.0.0.1:4444".into())).unwrap(),
            "tcp:127.0.0.1:4444,server=on,wait=off"
        );
        let long = format!("/tmp/{}", "x".repeat(120));
        assert!(matches!(
            qmp_listen_option(&Address::Unix(long.into())),
            Err(Error::ListenPathTooLong { .. })
        ));
    }

    #[test]
    fn watches_count_appearances_across_pieces() {
        let mut w = Watch::new("guest> ");
        assert_eq!(w.feed(b"ready\r\nguest> flood 5\r\n01234\r\ngu"), 1);
        assert_eq!(w.feed(b"est"), 0);
        assert_eq!(w.feed(b"> guest> "), 2);
        assert_eq!(w.feed(b""), 0);
        assert_eq!(Watch::new("").feed(b"abc"), 0);
    }
}
