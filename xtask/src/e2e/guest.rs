//! End-to-end scenarios for the tiny test guest (`machine_core::guest`), against QEMU spawned
//! directly: boot on each machine type, echo, flood, exit codes, power-off paths and panics.
//!
//! Also the helpers other areas may reuse: [`GuestVm`] (the guest booted with its console and
//! QMP monitor on socketpairs) and [`RawQmp`] (a minimal QMP reader/writer over raw JSON, so
//! these scenarios test the guest and QEMU without depending on our QMP client).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use console_socket::{Config as ConsoleConfig, Console, LineEnding, Pattern};
use machine_core::guest::{self, Command, GuestMachine};
use serde_json::{json, Value};

use super::{describe_status, socketpair, Accel, Ctx, QemuChild, Scenario};

const BOTH: &[Accel] = &[Accel::Tcg, Accel::Kvm];

/// The scenarios of this area.
pub fn scenarios() -> Vec<Scenario> {
    let timeout = Duration::from_secs(30);
    // SeaBIOS alone takes 4-10 s under this machine's nested KVM.
    let seabios = Duration::from_secs(60);
    vec![
        Scenario {
            name: "guest-boot-q35-qboot",
            accels: BOTH,
            timeout,
            run: |ctx| boot(ctx, GuestMachine::Q35),
        },
        Scenario {
            name: "guest-boot-pc-seabios",
            accels: BOTH,
            timeout: seabios,
            run: |ctx| boot(ctx, GuestMachine::Pc),
        },
        Scenario {
            name: "guest-echo-and-line-editing",
            accels: BOTH,
            timeout,
            run: echo,
        },
        Scenario {
            name: "guest-flood",
            accels: BOTH,
            timeout: Duration::from_secs(60),
            run: flood,
        },
        Scenario {
            name: "guest-exit-code",
            accels: BOTH,
            timeout,
            run: exit_code,
        },
        Scenario {
            name: "guest-poweroff-q35",
            accels: BOTH,
            timeout,
            run: |ctx| poweroff(ctx, GuestMachine::Q35),
        },
        Scenario {
            name: "guest-poweroff-pc",
            accels: BOTH,
            timeout: seabios,
            run: |ctx| poweroff(ctx, GuestMachine::Pc),
        },
        Scenario {
            name: "guest-system-powerdown-q35",
            accels: BOTH,
            timeout,
            run: |ctx| system_powerdown(ctx, GuestMachine::Q35),
        },
        Scenario {
            name: "guest-system-powerdown-pc",
            accels: BOTH,
            timeout: seabios,
            run: |ctx| system_powerdown(ctx, GuestMachine::Pc),
        },
        Scenario {
            name: "guest-error-paths-without-devices",
            accels: BOTH,
            timeout: seabios,
            run: error_paths,
        },
        Scenario {
            name: "guest-panic-reboots",
            accels: BOTH,
            timeout,
            run: panic_reboots,
        },
        Scenario {
            name: "guest-panic-no-reboot-exits",
            accels: BOTH,
            timeout,
            run: panic_no_reboot,
        },
    ]
}

/// The tiny guest running in QEMU, its console drained by a [`Console`] and its QMP monitor on a
/// second socketpair.
pub struct GuestVm {
    /// The QEMU process (killed and reaped on drop).
    pub qemu: QemuChild,
    /// COM1.
    pub console: Console,
    /// The QMP monitor, capabilities negotiated.
    pub qmp: RawQmp,
    /// Time from exec to the end of QMP negotiation (QEMU answers `qmp_capabilities` once the
    /// machine is built, before the firmware runs): the same-run baseline for boot times.
    pub qmp_ready: Duration,
}

impl GuestVm {
    /// Boots the guest on `machine` under the context's accelerator, with `extra` QEMU
    /// arguments; returns once QMP is negotiated (the guest may still be booting).
    pub fn launch(ctx: &Ctx, machine: GuestMachine, extra: &[&str]) -> Result<GuestVm, String> {
        let kernel = ctx.write_guest_kernel()?;
        GuestVm::launch_with(ctx, guest::qemu_args(&kernel, machine), extra)
    }

    /// Like [`GuestVm::launch`], with the machine arguments given in full (for machines
    /// [`guest::qemu_args`] does not describe, e.g. without the `isa-debug-exit` device).
    pub fn launch_with(
        ctx: &Ctx,
        machine_args: Vec<std::ffi::OsString>,
        extra: &[&str],
    ) -> Result<GuestVm, String> {
        let (console_ours, console_theirs) = socketpair()?;
        let (qmp_ours, qmp_theirs) = socketpair()?;
        let mut cmd = ctx.qemu_command();
        cmd.args(machine_args)
            .args(ctx.accel_args())
            .args(["-nodefaults", "-display", "none"]);
        let console_fd = cmd.pass_fd(console_theirs);
        let qmp_fd = cmd.pass_fd(qmp_theirs);
        cmd.arg("-chardev")
            .arg(format!("socket,id=con,fd={console_fd}"))
            .args(["-serial", "chardev:con"])
            .arg("-chardev")
            .arg(format!("socket,id=qmp,fd={qmp_fd}"))
            .args(["-mon", "chardev=qmp,mode=control"])
            .args(extra);
        // The console drains from before QEMU starts, so no output is ever lost or blocks.
        let console = Console::from_unix_stream(
            console_ours,
            ConsoleConfig::default()
                .with_line_ending(LineEnding::Lf)
                .with_buffer_capacity(8 << 20)
                .with_log_file(ctx.scratch.join("console.log")),
        )
        .map_err(|e| format!("console: {}", chain(&e)))?;
        let qemu = cmd.spawn()?;
        let mut qmp = RawQmp::new(qmp_ours);
        qmp.handshake(ctx.deadline)
            .map_err(|e| format!("{e}; qemu log: {}", qemu.log_tail()))?;
        let qmp_ready = qemu.started().elapsed();
        Ok(GuestVm {
            qemu,
            console,
            qmp,
            qmp_ready,
        })
    }

    /// Waits for the banner and the first prompt; returns the time from exec to the banner.
    pub fn wait_ready(&mut self, ctx: &Ctx) -> Result<Duration, String> {
        let banner = format!("{}\r\n{}", guest::BANNER, guest::PROMPT);
        self.wait_console(&banner, ctx)?;
        Ok(self.qemu.started().elapsed())
    }

    /// Waits for `text` on the console until the context's deadline.
    pub fn wait_console(&mut self, text: &str, ctx: &Ctx) -> Result<console_socket::Match, String> {
        self.console
            .wait_for(&Pattern::substring(text), ctx.remaining())
            .map_err(|e| {
                format!(
                    "waiting for {text:?} on the console: {}; qemu log: {}",
                    chain(&e),
                    self.qemu.log_tail()
                )
            })
    }

    /// Sends a guest command line.
    pub fn send(&self, command: Command) -> Result<(), String> {
        self.send_raw(command.to_line().as_bytes())
    }

    /// Sends raw bytes to the guest's UART.
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), String> {
        self.console
            .send(bytes)
            .map_err(|e| format!("console send: {}", chain(&e)))
    }
}

/// A minimal QMP peer over raw JSON lines: enough to negotiate, run a command, and collect the
/// events that arrive before, between and after replies.
pub struct RawQmp {
    stream: UnixStream,
    buffer: Vec<u8>,
    /// Events seen while waiting for something else, oldest first.
    events: VecDeque<Value>,
    closed: bool,
}

impl RawQmp {
    /// Wraps our end of the monitor socket.
    pub fn new(stream: UnixStream) -> RawQmp {
        RawQmp {
            stream,
            buffer: Vec::new(),
            events: VecDeque::new(),
            closed: false,
        }
    }

    /// Reads the greeting and negotiates capabilities.
    pub fn handshake(&mut self, deadline: Instant) -> Result<(), String> {
        let greeting = self.read_message(deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(format!("expected the QMP greeting, got {greeting}"));
        }
        self.execute("qmp_capabilities", deadline).map(drop)
    }

    /// Sends `{"execute": name}` and returns its `return` value; events that come first are
    /// queued.
    pub fn execute(&mut self, name: &str, deadline: Instant) -> Result<Value, String> {
        let command = json!({ "execute": name }).to_string();
        // One write, no trailing newline (QEMU resets the socket otherwise after `quit`).
        self.send(command.as_bytes())
            .map_err(|e| format!("{name}: {e}"))?;
        loop {
            let message = self.read_message(deadline)?;
            if message.get("event").is_some() {
                self.events.push_back(message);
            } else if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            } else {
                return Err(format!("{name} failed: {message}"));
            }
        }
    }

    /// The next event named `name` (earlier events of other names are dropped).
    pub fn wait_event(&mut self, name: &str, deadline: Instant) -> Result<Value, String> {
        loop {
            let event = match self.events.pop_front() {
                Some(event) => event,
                None => self.read_message(deadline)?,
            };
            if event.get("event").and_then(Value::as_str) == Some(name) {
                return Ok(event);
            }
        }
    }

    /// Reads until the socket closes; returns the events seen on the way (queued ones first).
    pub fn read_to_eof(&mut self, deadline: Instant) -> Result<Vec<Value>, String> {
        let mut events: Vec<Value> = self.events.drain(..).collect();
        loop {
            match self.read_message(deadline) {
                Ok(message) => events.push(message),
                Err(_) if self.closed => return Ok(events),
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes `bytes` as they are, in one write: commands, several at once, or anything else.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("qmp send: {e}"))
    }

    /// The next message, whatever it is (events are not queued here), before `deadline`.
    pub fn read_message(&mut self, deadline: Instant) -> Result<Value, String> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                if text.trim().is_empty() {
                    continue;
                }
                return serde_json::from_str(text.trim())
                    .map_err(|e| format!("bad QMP line {text:?}: {e}"));
            }
            if self.closed {
                return Err("QMP socket closed".to_string());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("QMP: deadline passed".to_string());
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| format!("qmp: {e}"))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                // QEMU exiting with our input unread resets the connection: an end like EOF.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => self.closed = true,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err("QMP: deadline passed".to_string());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("qmp read: {e}")),
            }
        }
    }
}

/// An error and its sources, joined with ": ".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

/// Checks an event's `data` against the fields expected.
fn expect_data(event: &Value, expected: &Value) -> Result<(), String> {
    match event.get("data") {
        Some(data) if qmp_proto::event_match(data, expected) => Ok(()),
        _ => Err(format!("expected data {expected} in {event}")),
    }
}

/// Boots, waits for the banner and the prompt, then exits through `exit 0`.
fn boot(ctx: &Ctx, machine: GuestMachine) -> Result<(), String> {
    let mut vm = GuestVm::launch(ctx, machine, &[])?;
    let took = vm.wait_ready(ctx)?;
    ctx.note(format!(
        "{machine}: exec -> banner {} (exec -> QMP negotiated {})",
        ms(took),
        ms(vm.qmp_ready)
    ));
    vm.send(Command::Exit(0))?;
    let status = vm.qemu.wait_until(ctx.deadline)?;
    if status.code() != Some(guest::exit_status_for(0)) {
        return Err(format!("exit 0 gave {}", describe_status(status)));
    }
    Ok(())
}

/// Echo, unknown commands, erasing, CR LF counted once, overlong lines, bad numbers.
fn echo(ctx: &Ctx) -> Result<(), String> {
    let mut vm = GuestVm::launch(ctx, GuestMachine::Q35, &[])?;
    vm.wait_ready(ctx)?;
    let help = format!("help\r\n{}guest> ", guest::HELP_TEXT);
    let steps: [(&[u8], &str); 6] = [
        // Typo erased with backspace, CR LF ends one line only.
        (
            b"hellp\x08o\r\n",
            "hellp\x08 \x08o\r\nERR unknown command: hello (try help)\r\nguest> ",
        ),
        // An empty line gives a prompt; LF alone ends a line.
        (b"\n", "\r\nguest> "),
        // `help` lists the commands.
        (b"help\r", &help),
        (b"flood x1\r", "flood x1\r\nERR bad number\r\nguest> "),
        (
            b"exit 1234567890\r",
            "exit 1234567890\r\nERR bad number\r\nguest> ",
        ),
        (
            b"FLOOD 1\r",
            "FLOOD 1\r\nERR unknown command: FLOOD 1 (try help)\r\nguest> ",
        ),
    ];
    for (input, expected) in steps {
        vm.send_raw(input)?;
        let found = vm.wait_console(guest::PROMPT, ctx)?;
        let got = found.text();
        if got != expected.as_bytes() {
            return Err(format!(
                "after {:?}: expected {expected:?}, got {:?}",
                String::from_utf8_lossy(input),
                String::from_utf8_lossy(got)
            ));
        }
    }
    let long = "x".repeat(guest::LINE_MAX + 1);
    vm.send_raw(format!("{long}\r").as_bytes())?;
    let found = vm.wait_console(guest::PROMPT, ctx)?;
    let expected = format!("{long}\r\nERR line too long\r\nguest> ");
    if found.text() != expected.as_bytes() {
        return Err(format!(
            "overlong line: got {:?}",
            String::from_utf8_lossy(found.text())
        ));
    }
    vm.send(Command::Exit(0))?;
    vm.qemu.wait_until(ctx.deadline).map(drop)
}

/// `flood N` arrives complete and in order, followed by the marker; measures throughput.
fn flood(ctx: &Ctx) -> Result<(), String> {
    // Under this machine's nested KVM every UART access is a slow exit: flood less there.
    let count: u32 = match ctx.accel {
        Accel::Tcg => 1_000_000,
        Accel::Kvm => 100_000,
    };
    let mut vm = GuestVm::launch(ctx, GuestMachine::Q35, &[])?;
    vm.wait_ready(ctx)?;
    let command = Command::Flood(count);
    vm.send(command)?;
    vm.wait_console(&format!("{command}\r\n"), ctx)?;
    let started = Instant::now();
    let marker = format!("\r\n{}\r\n", guest::FLOOD_DONE);
    let found = vm.wait_console(&marker, ctx)?;
    let took = started.elapsed();
    let data = found.before();
    if data.len() != count as usize {
        return Err(format!("expected {count} bytes, got {}", data.len()));
    }
    if let Some(at) = data
        .iter()
        .enumerate()
        .position(|(i, &b)| b != guest::FLOOD_PATTERN[i % guest::FLOOD_PATTERN.len()])
    {
        return Err(format!(
            "byte {at} of the flood is wrong: {:#04x}",
            data[at]
        ));
    }
    if vm.console.bytes_dropped() != 0 {
        return Err(format!(
            "the console dropped {} bytes",
            vm.console.bytes_dropped()
        ));
    }
    ctx.note(format!(
        "{count} bytes in {} = {:.0} KB/s",
        ms(took),
        f64::from(count) / took.as_secs_f64() / 1000.0
    ));
    vm.wait_console(guest::PROMPT, ctx)?;
    vm.send(Command::Exit(0))?;
    vm.qemu.wait_until(ctx.deadline).map(drop)
}

/// `exit 5` ends QEMU with status 11. QEMU 7.2 just closes QMP; QEMU 10.0 and later first send
/// `SHUTDOWN {guest: true, reason: guest-shutdown}` (the same event as a clean power-off), so
/// only the exit status tells the failing guest apart.
fn exit_code(ctx: &Ctx) -> Result<(), String> {
    let mut vm = GuestVm::launch(ctx, GuestMachine::Q35, &[])?;
    vm.wait_ready(ctx)?;
    vm.send(Command::Exit(5))?;
    let sent = Instant::now();
    let status = vm.qemu.wait_until(ctx.deadline)?;
    let took = sent.elapsed();
    if status.code() != Some(11) {
        return Err(format!("expected exit 11, got {}", describe_status(status)));
    }
    let events = vm.qmp.read_to_eof(ctx.deadline)?;
    let shutdown = events.iter().find(|e| e["event"] == "SHUTDOWN");
    match shutdown {
        Some(event) if !ctx.qemu_at_least(10, 0) => {
            return Err(format!("isa-debug-exit gave a SHUTDOWN event: {event}"));
        }
        Some(event) => expect_data(event, &json!({"guest": true, "reason": "guest-shutdown"}))?,
        None if ctx.qemu_at_least(10, 0) => {
            return Err("isa-debug-exit gave no SHUTDOWN event on QEMU 10.0 or later".into());
        }
        None => {}
    }
    ctx.note(format!(
        "exit 5 -> process exit 11 in {}; SHUTDOWN event before the exit: {}",
        ms(took),
        shutdown.map_or("none".to_string(), |e| e["data"].to_string())
    ));
    Ok(())
}

/// `poweroff` (ACPI S5) ends QEMU with status 0 after a guest-initiated SHUTDOWN event.
fn poweroff(ctx: &Ctx, machine: GuestMachine) -> Result<(), String> {
    let mut vm = GuestVm::launch(ctx, machine, &[])?;
    vm.wait_ready(ctx)?;
    vm.send(Command::Poweroff)?;
    let sent = Instant::now();
    vm.wait_console(guest::POWEROFF_LINE, ctx)?;
    let shutdown = vm.qmp.wait_event("SHUTDOWN", ctx.deadline)?;
    expect_data(
        &shutdown,
        &json!({"guest": true, "reason": "guest-shutdown"}),
    )?;
    let status = vm.qemu.wait_until(ctx.deadline)?;
    if status.code() != Some(0) {
        return Err(format!("expected exit 0, got {}", describe_status(status)));
    }
    ctx.note(format!(
        "{machine}: poweroff -> exit in {}",
        ms(sent.elapsed())
    ));
    Ok(())
}

/// QMP `system_powerdown` gives POWERDOWN, the guest sees the power button and powers off:
/// SHUTDOWN and process exit within one second.
fn system_powerdown(ctx: &Ctx, machine: GuestMachine) -> Result<(), String> {
    let mut vm = GuestVm::launch(ctx, machine, &[])?;
    vm.wait_ready(ctx)?;
    let sent = Instant::now();
    vm.qmp.execute("system_powerdown", ctx.deadline)?;
    vm.qmp.wait_event("POWERDOWN", ctx.deadline)?;
    let shutdown = vm.qmp.wait_event("SHUTDOWN", ctx.deadline)?;
    expect_data(
        &shutdown,
        &json!({"guest": true, "reason": "guest-shutdown"}),
    )?;
    let limit = sent + Duration::from_secs(1);
    let status = vm.qemu.wait_until(limit.min(ctx.deadline))?;
    let took = sent.elapsed();
    if status.code() != Some(0) {
        return Err(format!("expected exit 0, got {}", describe_status(status)));
    }
    let line = format!(
        "{}\r\n{}\r\n",
        guest::POWER_BUTTON_LINE,
        guest::POWEROFF_LINE
    );
    vm.wait_console(&line, ctx)?;
    ctx.note(format!(
        "{machine}: system_powerdown -> exit in {}",
        ms(took)
    ));
    Ok(())
}

/// `panic` triple-faults: QEMU resets the machine (RESET from the guest) and the guest boots
/// again.
fn panic_reboots(ctx: &Ctx) -> Result<(), String> {
    let mut vm = GuestVm::launch(ctx, GuestMachine::Q35, &[])?;
    vm.wait_ready(ctx)?;
    vm.send(Command::Panic)?;
    vm.wait_console(guest::PANIC_LINE, ctx)?;
    let reset = vm.qmp.wait_event("RESET", ctx.deadline)?;
    expect_data(&reset, &json!({"guest": true, "reason": "guest-reset"}))?;
    let sent = Instant::now();
    let banner = format!("{}\r\n{}", guest::BANNER, guest::PROMPT);
    vm.wait_console(&banner, ctx)?;
    ctx.note(format!("reset -> banner again in {}", ms(sent.elapsed())));
    vm.send(Command::Exit(0))?;
    vm.qemu.wait_until(ctx.deadline).map(drop)
}

/// With `-no-reboot`, the triple fault ends QEMU: SHUTDOWN (guest-reset) and exit 0.
fn panic_no_reboot(ctx: &Ctx) -> Result<(), String> {
    let mut vm = GuestVm::launch(ctx, GuestMachine::Q35, &["-no-reboot"])?;
    vm.wait_ready(ctx)?;
    vm.send(Command::Panic)?;
    let shutdown = vm.qmp.wait_event("SHUTDOWN", ctx.deadline)?;
    expect_data(&shutdown, &json!({"guest": true, "reason": "guest-reset"}))?;
    let status = vm.qemu.wait_until(ctx.deadline)?;
    if status.code() != Some(0) {
        return Err(format!("expected exit 0, got {}", describe_status(status)));
    }
    Ok(())
}

/// Without an `isa-debug-exit` device and without ACPI (`-M pc,acpi=off` has no PIIX4 PM
/// function), `exit` and `poweroff` report errors and the guest keeps serving; QMP `quit` then
/// ends it.
fn error_paths(ctx: &Ctx) -> Result<(), String> {
    let kernel = ctx.write_guest_kernel()?;
    let args = ["-M", "pc,acpi=off", "-kernel"]
        .iter()
        .map(Into::into)
        .chain([kernel.into_os_string()])
        .collect();
    let mut vm = GuestVm::launch_with(ctx, args, &[])?;
    vm.wait_ready(ctx)?;
    let steps = [
        (Command::Exit(3), "ERR no isa-debug-exit device"),
        (Command::Poweroff, "ERR no ACPI PM found"),
    ];
    for (command, error) in steps {
        vm.send(command)?;
        let found = vm.wait_console(guest::PROMPT, ctx)?;
        let expected = format!("{command}\r\n{error}\r\n{}", guest::PROMPT);
        if found.text() != expected.as_bytes() {
            return Err(format!(
                "{command}: expected {expected:?}, got {:?}",
                found.text_lossy()
            ));
        }
    }
    vm.qmp.execute("quit", ctx.deadline)?;
    let shutdown = vm.qmp.wait_event("SHUTDOWN", ctx.deadline)?;
    expect_data(
        &shutdown,
        &json!({"guest": false, "reason": "host-qmp-quit"}),
    )?;
    let status = vm.qemu.wait_until(ctx.deadline)?;
    if status.code() != Some(0) {
        return Err(format!("expected exit 0, got {}", describe_status(status)));
    }
    Ok(())
}
