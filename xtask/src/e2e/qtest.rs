//! End-to-end scenarios for the qtest area: `QtestProtocol` against a real QEMU (PCI config
//! reads, IRQ interception, memory round trips, the virtual clock, EOF, latency).
//!
//! QEMU is spawned directly here with the child end of a socketpair as
//! `-chardev socket,id=qtest,fd=N -qtest chardev:qtest`. Debian's QEMU 7.2 ships without the
//! `qtest` accelerator, so the scenarios run under the suite's accelerator (TCG by default):
//! with `-S` nothing runs but what qtest does (deterministic device state), without it the
//! firmware runs (it programs the PM base). `clock_step`/`clock_set` need `-accel qtest`; the
//! clock scenario uses it when the binary has it and otherwise checks that the refusal is typed
//! and leaves the channel in sync.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use machine_core::qtest::{
    self, Config, Endianness, IrqEdge, IrqEvent, QtestAccel, QtestMachine, QtestProtocol,
};
use machine_core::MachineBuilder;

use super::{socketpair, Accel, Ctx, QemuChild, Scenario};

/// The scenarios of this area.
pub fn scenarios() -> Vec<Scenario> {
    let tcg: &'static [Accel] = &[Accel::Tcg];
    let both: &'static [Accel] = &[Accel::Tcg, Accel::Kvm];
    vec![
        Scenario {
            name: "qtest_pm_base_pc",
            accels: both,
            timeout: Duration::from_secs(20),
            run: |ctx| pm_base(ctx, "pc", 0x8000_0b40),
        },
        Scenario {
            name: "qtest_pm_base_q35",
            accels: both,
            timeout: Duration::from_secs(20),
            run: |ctx| pm_base(ctx, "q35", 0x8000_f840),
        },
        Scenario {
            name: "qtest_irq_intercept",
            accels: both,
            timeout: Duration::from_secs(20),
            run: irq_intercept,
        },
        Scenario {
            name: "qtest_memory_round_trip",
            accels: both,
            timeout: Duration::from_secs(30),
            run: memory_round_trip,
        },
        Scenario {
            name: "qtest_clock",
            accels: tcg,
            timeout: Duration::from_secs(20),
            run: clock,
        },
        Scenario {
            name: "qtest_eof_when_qemu_dies",
            accels: tcg,
            timeout: Duration::from_secs(20),
            run: eof_when_qemu_dies,
        },
        Scenario {
            name: "qtest_machine_lifecycle",
            accels: both,
            timeout: Duration::from_secs(40),
            run: machine_lifecycle,
        },
        Scenario {
            name: "qtest_machine_default_accel",
            accels: tcg,
            timeout: Duration::from_secs(20),
            run: machine_default_accel,
        },
        Scenario {
            name: "qtest_latency",
            accels: tcg,
            timeout: Duration::from_secs(60),
            run: latency,
        },
    ]
}

/// Spawns QEMU with `args` plus the qtest channel (QEMU's end of a socketpair handed over as
/// `-chardev socket,id=qtest,fd=N`); returns the child and our end.
fn spawn(ctx: &Ctx, args: &[&str]) -> Result<(QemuChild, UnixStream), String> {
    let (ours, theirs) = socketpair()?;
    let mut cmd = ctx.qemu_command();
    let fd = cmd.pass_fd(theirs);
    cmd.args(["-nodefaults", "-display", "none"])
        .args(["-chardev", &format!("socket,id=qtest,fd={fd}")])
        .args(["-qtest", "chardev:qtest", "-qtest-log", "/dev/null"])
        .args(args);
    Ok((cmd.spawn()?, ours))
}

/// Spawns QEMU and wraps our end in a `QtestProtocol` with a short command timeout.
fn launch(ctx: &Ctx, args: &[&str]) -> Result<(QemuChild, QtestProtocol), String> {
    let (qemu, ours) = spawn(ctx, args)?;
    let config = Config::default().with_command_timeout(Duration::from_secs(5));
    let q = QtestProtocol::from_unix_stream(ours, config).map_err(|e| e.to_string())?;
    Ok((qemu, q))
}

/// Formats an error with its sources and the tail of QEMU's log.
fn fail(qemu: &QemuChild, what: &str, err: &dyn std::error::Error) -> String {
    let mut msg = chain(what, err);
    let log = qemu.log_tail();
    if !log.is_empty() {
        msg.push_str(&format!(" (qemu log: {log})"));
    }
    msg
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

/// Reads the ACPI PM base from PCI config space after the firmware programmed it.
///
/// The firmware (SeaBIOS under TCG) sets it to 0x600 within about 100 ms; qtest port
/// accesses and the firmware's own 0xcf8 accesses can interleave while it runs, so the
/// value is polled until it reads 0x601 (base 0x600, bit 0 = I/O space) twice in a row.
fn pm_base(ctx: &Ctx, machine: &str, cf8: u32) -> Result<(), String> {
    let (qemu, mut q) = launch(ctx, &["-M", machine, "-accel", ctx.accel.as_str()])?;
    let mut last = None;
    let mut stable = 0;
    while stable < 2 {
        if Instant::now() > ctx.deadline {
            return Err(format!(
                "{machine}: PM base never read 0x601 (last {last:#x?})"
            ));
        }
        q.outl(0xcf8, cf8)
            .map_err(|e| fail(&qemu, "outl 0xcf8", &e))?;
        let value = q.inl(0xcfc).map_err(|e| fail(&qemu, "inl 0xcfc", &e))?;
        stable = if value == 0x601 { stable + 1 } else { 0 };
        last = Some(value);
        if value != 0x601 {
            // The firmware is still running: give it a moment (bounded by ctx.deadline).
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // The PM timer (base + 8) counts at 3.579545 MHz while the machine runs.
    let t0 = q.inl(0x608).map_err(|e| fail(&qemu, "inl 0x608", &e))?;
    let mut t1 = t0;
    while t1 == t0 && Instant::now() < ctx.deadline {
        t1 = q.inl(0x608).map_err(|e| fail(&qemu, "inl 0x608", &e))?;
    }
    check(t1 != t0, || format!("{machine}: PM timer stuck at {t0:#x}"))
}

/// Sees device IRQs through `irq_intercept_in ioapic`, before the reply of the command that
/// caused them, and a forced GPIO level through `set_irq_in`.
fn irq_intercept(ctx: &Ctx) -> Result<(), String> {
    let (qemu, mut q) = launch(ctx, &["-M", "pc", "-accel", ctx.accel.as_str(), "-S"])?;
    q.irq_intercept_in("ioapic")
        .map_err(|err| fail(&qemu, "irq_intercept_in", &err))?;
    // A second device cannot be intercepted: typed FAIL, channel still in sync.
    match q.irq_intercept_in("/machine/unattached/device[0]") {
        Err(qtest::Error::Failed { .. }) => {}
        other => return Err(format!("second intercept: expected FAIL, got {other:?}")),
    }
    // i8042 command 0xd2 "write keyboard output buffer": the byte lands in the output buffer
    // and, keyboard interrupts being enabled after reset, raises ISA IRQ 1 at once.
    q.outb(0x64, 0xd2)
        .map_err(|err| fail(&qemu, "outb", &err))?;
    q.outb(0x60, 0x5a)
        .map_err(|err| fail(&qemu, "outb", &err))?;
    check(q.irq_level(1), || {
        "IRQ 1 not raised when outb returned".to_string()
    })?;
    let status = q.inb(0x64).map_err(|err| fail(&qemu, "inb 0x64", &err))?;
    check(status & 1 == 1, || {
        format!("i8042 status {status:#x}: OBF clear")
    })?;
    // Reading the data port empties the buffer and lowers IRQ 1.
    let data = q.inb(0x60).map_err(|err| fail(&qemu, "inb 0x60", &err))?;
    check(data == 0x5a, || {
        format!("i8042 data {data:#x}, expected 0x5a")
    })?;
    check(!q.irq_level(1), || "IRQ 1 still high".to_string())?;
    let events = q.irq_events();
    let want = [
        IrqEvent {
            irq: 1,
            edge: IrqEdge::Raise,
        },
        IrqEvent {
            irq: 1,
            edge: IrqEdge::Lower,
        },
    ];
    check(events == want, || {
        format!("events {events:?}, expected {want:?}")
    })?;
    // Force GPIO 9 of the IOAPIC high and low: the intercept reports both edges.
    q.set_irq_in("ioapic", None, 9, 1)
        .map_err(|err| fail(&qemu, "set_irq_in", &err))?;
    q.wait_irq(9, IrqEdge::Raise, Duration::from_secs(2))
        .map_err(|err| fail(&qemu, "wait_irq 9 raise", &err))?;
    q.set_irq_in("ioapic", None, 9, 0)
        .map_err(|err| fail(&qemu, "set_irq_in", &err))?;
    q.wait_irq(9, IrqEdge::Lower, Duration::from_secs(2))
        .map_err(|err| fail(&qemu, "wait_irq 9 lower", &err))?;
    check(q.irq_events().is_empty(), || "stray IRQ events".to_string())?;
    // Nothing else fires while the machine is stopped.
    match q.next_irq(Duration::from_millis(50)) {
        Err(qtest::Error::IrqTimeout { .. }) => Ok(()),
        other => Err(format!("expected no IRQ, got {other:?}")),
    }
}

/// Writes and reads guest RAM with every width and the bulk commands.
fn memory_round_trip(ctx: &Ctx) -> Result<(), String> {
    let (qemu, mut q) = launch(
        ctx,
        &["-M", "pc", "-m", "64", "-accel", ctx.accel.as_str(), "-S"],
    )?;
    let m = |what: &'static str| move |err: qtest::Error| (what, err);
    let run = |q: &mut QtestProtocol| -> Result<(), (&'static str, qtest::Error)> {
        let endianness = q.endianness().map_err(m("endianness"))?;
        if endianness != Endianness::Little {
            return Err((
                "endianness",
                qtest::Error::BadReply {
                    command: "endianness".into(),
                    line: format!("{endianness:?}"),
                },
            ));
        }
        q.writel(0x10_0000, 0xdead_beef).map_err(m("writel"))?;
        q.writeq(0x10_0008, 0x0123_4567_89ab_cdef)
            .map_err(m("writeq"))?;
        q.writew(0x10_0010, 0xbeef).map_err(m("writew"))?;
        q.writeb(0x10_0012, 0x7f).map_err(m("writeb"))?;
        let l = q.readl(0x10_0000).map_err(m("readl"))?;
        let qv = q.readq(0x10_0008).map_err(m("readq"))?;
        let w = q.readw(0x10_0010).map_err(m("readw"))?;
        let b = q.readb(0x10_0012).map_err(m("readb"))?;
        // Little-endian target: the low byte of the long comes first in memory.
        let first = q.readb(0x10_0000).map_err(m("readb"))?;
        let mismatch = |what: &str, got: u64, want: u64| {
            (
                "compare",
                qtest::Error::BadReply {
                    command: what.to_string(),
                    line: format!("{got:#x} != {want:#x}"),
                },
            )
        };
        for (what, got, want) in [
            ("readl", u64::from(l), 0xdead_beef),
            ("readq", qv, 0x0123_4567_89ab_cdef),
            ("readw", u64::from(w), 0xbeef),
            ("readb", u64::from(b), 0x7f),
            ("readb low byte", u64::from(first), 0xef),
        ] {
            if got != want {
                return Err(mismatch(what, got, want));
            }
        }
        // 256 KiB of pseudo-random bytes through write/read and b64write/b64read.
        let data = pseudo_random(256 << 10, 0x9e37_79b9);
        q.write(0x20_0000, &data).map_err(m("write"))?;
        let back = q.read(0x20_0000, data.len()).map_err(m("read"))?;
        if back != data {
            return Err(mismatch("read after write", 0, 1));
        }
        let data2 = pseudo_random(100_003, 7);
        q.b64write(0x30_0000, &data2).map_err(m("b64write"))?;
        let back2 = q.b64read(0x30_0000, data2.len()).map_err(m("b64read"))?;
        if back2 != data2 {
            return Err(mismatch("b64read after b64write", 0, 1));
        }
        // Cross-check the two encodings on the same bytes.
        let hex_view = q.read(0x30_0000, 4096).map_err(m("read"))?;
        if hex_view != data2[..4096] {
            return Err(mismatch("read of b64-written bytes", 0, 1));
        }
        q.memset(0x40_0000, 4096, 0xa5).map_err(m("memset"))?;
        let filled = q.read(0x40_0000, 4096).map_err(m("read"))?;
        if filled.iter().any(|&x| x != 0xa5) {
            return Err(mismatch("memset", 0, 0xa5));
        }
        Ok(())
    };
    run(&mut q).map_err(|(what, err)| fail(&qemu, what, &err))
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Whether the QEMU binary has the `qtest` accelerator (Debian's 7.2 and 10.0 do not; 11.1 has it
/// without listing it in `-accel help`), by starting it.
fn has_qtest_accel(ctx: &Ctx) -> Result<bool, String> {
    Ok(crate::qemu::probe_accel(&ctx.qemu, "qtest").is_ok())
}

/// With `-accel qtest`: `clock_step` advances the virtual clock by the step, `clock_set`
/// moves it to a point, and stepping to the next deadline makes the PIT fire IRQ 0.
/// Without it: `clock_step` is refused with a typed FAIL and the channel stays in sync.
fn clock(ctx: &Ctx) -> Result<(), String> {
    if !has_qtest_accel(ctx)? {
        ctx.note(format!(
            "{} has no qtest accelerator: checked the typed refusal instead",
            ctx.qemu.display()
        ));
        let (qemu, mut q) = launch(ctx, &["-M", "pc", "-accel", ctx.accel.as_str(), "-S"])?;
        match q.clock_step(Some(1_000_000)) {
            Err(qtest::Error::Failed { command, message }) => {
                check(command == "clock_step 1000000", || command.clone())?;
                check(message.contains("clock_step"), || message.clone())?;
            }
            other => return Err(format!("clock_step: expected FAIL, got {other:?}")),
        }
        let e = q
            .endianness()
            .map_err(|err| fail(&qemu, "endianness after FAIL", &err))?;
        return check(e == Endianness::Little, || format!("{e:?}"));
    }
    let (qemu, mut q) = launch(ctx, &["-M", "pc", "-accel", "qtest"])?;
    // A step of 0 to read the clock is refused (`FAIL could not advance time`, QEMU 11.1):
    // the clock must move, so take a 1 ns step.
    let t0 = q
        .clock_step(Some(1))
        .map_err(|err| fail(&qemu, "clock_step 1", &err))?;
    let t1 = q
        .clock_step(Some(1_000_000))
        .map_err(|err| fail(&qemu, "clock_step", &err))?;
    check(t1 == t0 + 1_000_000, || format!("clock {t0} -> {t1}"))?;
    let t2 = q
        .clock_set(t1 + 5_000_000)
        .map_err(|err| fail(&qemu, "clock_set", &err))?;
    check(t2 == t1 + 5_000_000, || format!("clock_set {t1} -> {t2}"))?;
    q.irq_intercept_in("ioapic")
        .map_err(|err| fail(&qemu, "irq_intercept_in", &err))?;
    // PIT channel 0, mode 2 (rate generator), divisor 1193 (about 1 ms).
    q.outb(0x43, 0x34)
        .map_err(|err| fail(&qemu, "outb", &err))?;
    q.outb(0x40, 0xa9)
        .map_err(|err| fail(&qemu, "outb", &err))?;
    q.outb(0x40, 0x04)
        .map_err(|err| fail(&qemu, "outb", &err))?;
    for _ in 0..4 {
        q.clock_step(None)
            .map_err(|err| fail(&qemu, "clock_step", &err))?;
    }
    let seen = q.irq_events().iter().any(|e| e.irq == 0);
    check(seen, || "no IRQ 0 after stepping the PIT".to_string())
}

/// SIGKILL of QEMU while a wait is pending ends it with `Closed` at once, not at its deadline.
fn eof_when_qemu_dies(ctx: &Ctx) -> Result<(), String> {
    let (mut qemu, mut q) = launch(ctx, &["-M", "pc", "-accel", ctx.accel.as_str(), "-S"])?;
    q.endianness()
        .map_err(|err| fail(&qemu, "endianness", &err))?;
    let pid = nix::unistd::Pid::from_raw(
        i32::try_from(qemu.pid()).map_err(|_| format!("pid {} out of range", qemu.pid()))?,
    );
    let killed_at = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("kill: {e}"))?;
    let outcome = q.next_irq(Duration::from_secs(10));
    let took = killed_at.elapsed();
    let status = qemu.kill()?;
    match outcome {
        Err(qtest::Error::Closed { .. }) => {}
        other => return Err(format!("expected Closed, got {other:?} ({status})")),
    }
    check(took < Duration::from_secs(2), || {
        format!("Closed only after {took:?}")
    })?;
    match q.inb(0x60) {
        Err(qtest::Error::Closed { .. }) => Ok(()),
        other => Err(format!("command after EOF: expected Closed, got {other:?}")),
    }
}

/// `QtestMachine` end to end: launch (QMP and qtest side by side), the firmware-programmed
/// PM base, an IRQ, shutdown through QMP, the channel gone afterwards, and a second launch
/// with a fresh channel and unchanged arguments.
fn machine_lifecycle(ctx: &Ctx) -> Result<(), String> {
    let machine = MachineBuilder::new(&ctx.qemu)
        .machine_type("pc")
        .args(["-nodefaults", "-accel", ctx.accel.as_str()])
        .build();
    let args_before = machine.args().to_vec();
    let mut vm = QtestMachine::new(machine)
        .with_accel(QtestAccel::FromArgs)
        .with_config(Config::default().with_command_timeout(Duration::from_secs(5)));
    match vm.qtest() {
        Err(qtest::Error::NotRunning) => {}
        other => return Err(format!("qtest() before launch: {other:?}")),
    }
    for round in 0..2 {
        let started = Instant::now();
        vm.launch()
            .map_err(|e| chain(&format!("launch {round}"), &e))?;
        let launched = started.elapsed();
        if vm.args() != args_before.as_slice() {
            return Err(format!("arguments changed: {:?}", vm.args()));
        }
        let status = vm
            .cmd("query-status", ())
            .map_err(|e| chain("query-status", &e))?;
        if status["status"] != "running" {
            return Err(format!("query-status: {status}"));
        }
        // The firmware programs the PM base while we poll it. 0xcf8 is shared with the
        // firmware's own config cycles: a write of ours between its 0xcf8 write and its 0xcfc
        // access would redirect that access (and a tight loop of ours can keep the PM base
        // from ever being set). So each poll stops the vCPU, saves 0xcf8, reads, restores it,
        // and lets the firmware run a little before the next poll.
        let mut value = 0;
        let poll_until = (Instant::now() + Duration::from_secs(15)).min(ctx.deadline);
        while value != 0x601 && Instant::now() < poll_until {
            vm.cmd("stop", ()).map_err(|e| chain("stop", &e))?;
            let q = vm.qtest().map_err(|e| chain("qtest()", &e))?;
            let saved = q.inl(0xcf8).map_err(|e| chain("inl 0xcf8", &e))?;
            q.outl(0xcf8, 0x8000_0b40).map_err(|e| chain("outl", &e))?;
            value = q.inl(0xcfc).map_err(|e| chain("inl", &e))?;
            q.outl(0xcf8, saved)
                .map_err(|e| chain("restore 0xcf8", &e))?;
            vm.cmd("cont", ()).map_err(|e| chain("cont", &e))?;
            if value != 0x601 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        check(value == 0x601, || format!("PM base register {value:#x}"))?;
        // Stop the vCPU so only qtest touches the i8042, then watch IRQ 1.
        vm.cmd("stop", ()).map_err(|e| chain("stop", &e))?;
        let q = vm.qtest().map_err(|e| chain("qtest()", &e))?;
        q.irq_intercept_in("ioapic")
            .map_err(|e| chain("irq_intercept_in", &e))?;
        q.outb(0x64, 0xd2).map_err(|e| chain("outb", &e))?;
        q.outb(0x60, 0x42).map_err(|e| chain("outb", &e))?;
        q.wait_irq(1, IrqEdge::Raise, Duration::from_secs(2))
            .map_err(|e| chain("wait_irq", &e))?;
        let data = q.inb(0x60).map_err(|e| chain("inb", &e))?;
        check(data == 0x42, || format!("i8042 data {data:#x}"))?;
        let stopping = Instant::now();
        let report = vm.shutdown().map_err(|e| chain("shutdown", &e))?;
        let stopped = stopping.elapsed();
        if !report.status.success() {
            return Err(format!("shutdown report: {report}"));
        }
        match vm.qtest() {
            Err(qtest::Error::NotRunning) => {}
            other => return Err(format!("qtest() after shutdown: {other:?}")),
        }
        ctx.note(format!(
            "QtestMachine round {round}: launch (exec to QMP ready, qtest attached) {:.1} ms, \
             shutdown (quit to reaped) {:.1} ms",
            launched.as_secs_f64() * 1e3,
            stopped.as_secs_f64() * 1e3
        ));
    }
    Ok(())
}

/// The default `QtestAccel::Qtest` adds `-accel qtest`: with a QEMU that has it, the virtual
/// clock is ours; with one that lacks it (Debian's), the launch fails with a typed
/// `LaunchFailed` that names the accelerator, and nothing is left running.
fn machine_default_accel(ctx: &Ctx) -> Result<(), String> {
    let mut vm = QtestMachine::new(
        MachineBuilder::new(&ctx.qemu)
            .machine_type("pc")
            .args(["-nodefaults"])
            .build(),
    );
    let has = has_qtest_accel(ctx)?;
    match vm.launch() {
        Ok(()) if has => {
            let q = vm.qtest().map_err(|e| chain("qtest()", &e))?;
            let t0 = q.clock_step(Some(1)).map_err(|e| chain("clock_step", &e))?;
            let t1 = q
                .clock_step(Some(250_000))
                .map_err(|e| chain("clock_step", &e))?;
            check(t1 == t0 + 250_000, || format!("clock {t0} -> {t1}"))?;
            vm.shutdown().map_err(|e| chain("shutdown", &e))?;
            Ok(())
        }
        Err(machine_core::Error::LaunchFailed { output, .. }) if !has => {
            check(output.contains("qtest"), || format!("output: {output}"))?;
            check(!vm.is_running(), || "still running".to_string())?;
            match vm.qtest() {
                Err(qtest::Error::NotRunning) => Ok(()),
                other => Err(format!("qtest() after failed launch: {other:?}")),
            }
        }
        other => Err(format!(
            "qtest accelerator available: {has}; launch gave {other:?}"
        )),
    }
}

/// An error with its source chain, for scenario failures.
fn chain(what: &str, err: &dyn std::error::Error) -> String {
    let mut msg = format!("{what}: {err}");
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// Round trip of a qtest command through `QtestProtocol` against the same bytes over a plain
/// blocking socket (same QEMU, same run, alternating blocks of 100 so that load from other
/// processes hits both alike).
fn latency(ctx: &Ctx) -> Result<(), String> {
    const BLOCK: usize = 100;
    const ROUNDS: usize = 20;
    let (qemu, ours) = spawn(ctx, &["-M", "pc", "-accel", ctx.accel.as_str(), "-S"])?;
    let keep = ours.try_clone().map_err(|e| e.to_string())?;
    keep.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let mut reader = BufReader::new(keep.try_clone().map_err(|e| e.to_string())?);
    let mut q =
        QtestProtocol::from_unix_stream(ours, Config::default()).map_err(|e| e.to_string())?;
    for line in ["endianness", "inl 0xcfc", "readl 0x1000"] {
        let msg = format!("{line}\n");
        let mut reply = String::new();
        let mut base = Vec::with_capacity(BLOCK * ROUNDS);
        let mut mine = Vec::with_capacity(BLOCK * ROUNDS);
        for _ in 0..ROUNDS {
            // Baseline: one write, one blocking line read.
            keep.set_nonblocking(false)
                .map_err(|e| format!("set_nonblocking: {e}"))?;
            for _ in 0..BLOCK {
                let t = Instant::now();
                (&keep)
                    .write_all(msg.as_bytes())
                    .map_err(|e| format!("raw write: {e}"))?;
                reply.clear();
                reader
                    .read_line(&mut reply)
                    .map_err(|e| format!("raw read: {e}"))?;
                base.push(t.elapsed());
                if !reply.starts_with("OK") {
                    return Err(format!("raw reply {reply:?}"));
                }
            }
            keep.set_nonblocking(true)
                .map_err(|e| format!("set_nonblocking: {e}"))?;
            for _ in 0..BLOCK {
                let t = Instant::now();
                q.command(line).map_err(|err| fail(&qemu, line, &err))?;
                mine.push(t.elapsed());
            }
        }
        let (m, b) = (median(&mut mine), median(&mut base));
        ctx.note(format!(
            "qtest round trip `{line}`: QtestProtocol {:.1} us, baseline raw blocking socket \
             {:.1} us (medians of {}, alternating blocks)",
            m.as_secs_f64() * 1e6,
            b.as_secs_f64() * 1e6,
            BLOCK * ROUNDS
        ));
        // Generous bound: the client must not add more than 100 us over a raw socket.
        check(m < b + Duration::from_micros(100), || {
            format!("`{line}`: {m:?} against raw {b:?}")
        })?;
    }
    Ok(())
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    times.get(times.len() / 2).copied().unwrap_or_default()
}
