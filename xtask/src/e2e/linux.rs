//! Scenarios on the Linux test guest (Debian's cloud kernel, busybox, QEMU's guest agent; see
//! `machine_core::linux`): console shell, guest agent, PCIe hotplug, ACPI power-off, panic.
//!
//! Each boots its own guest under TCG (about 2.5 s to the ready line here). The guest is built
//! (or taken from the cache under `target/`) once per run, by the first scenario that needs it.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use machine_core::console_socket::{Outcome, Pattern, KERNEL_PANIC};
use machine_core::linux::{
    LinuxGuest, HOTPLUG_PORT, KNOWN_FILE, KNOWN_FILE_CONTENT, PROMPT, READY_LINE,
};
use machine_core::qmp_client::{Agent, AgentConfig, Error as QmpError};
use machine_core::qmp_proto::EventFilter;
use machine_core::{EndedBy, Machine, MachineBuilder};
use serde_json::json;

use super::{Accel, Ctx, Scenario};

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "linux-shell-and-agent",
            accels: &[Accel::Tcg],
            timeout: Duration::from_secs(300),
            run: shell_and_agent,
        },
        Scenario {
            name: "linux-hotplug-and-powerdown",
            accels: &[Accel::Tcg],
            timeout: Duration::from_secs(120),
            run: hotplug_and_powerdown,
        },
        Scenario {
            name: "linux-panic-pattern",
            accels: &[Accel::Tcg],
            timeout: Duration::from_secs(120),
            run: panic_pattern,
        },
    ]
}

/// The guest, built once per run (the first call may download and assemble it).
fn guest() -> Result<LinuxGuest, String> {
    static GUEST: OnceLock<Result<LinuxGuest, String>> = OnceLock::new();
    GUEST.get_or_init(crate::qemu::ensure_linux_guest).clone()
}

fn err(what: &str) -> impl Fn(machine_core::Error) -> String + '_ {
    move |e| {
        let mut text = format!("{what}: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    }
}

/// Launches `builder`'s machine and waits for the ready line and the first prompt; notes
/// exec -> ready.
fn boot(ctx: &Ctx, builder: &mut MachineBuilder) -> Result<Machine, String> {
    let mut vm = builder.base_temp_dir(&ctx.scratch).build();
    let started = Instant::now();
    vm.launch().map_err(err("launch"))?;
    let console = vm.console().map_err(err("console"))?;
    console
        .wait_for(&Pattern::substring(READY_LINE), ctx.remaining())
        .map_err(|e| format!("waiting for the ready line: {e}"))?;
    let ready = started.elapsed();
    console
        .wait_for(&Pattern::substring(PROMPT), ctx.remaining())
        .map_err(|e| format!("waiting for the first prompt: {e}"))?;
    ctx.note(format!(
        "exec -> ready line {:.0} ms (TCG, q35, qboot)",
        ready.as_secs_f64() * 1000.0
    ));
    Ok(vm)
}

/// Runs `command` on the console shell and returns its output and exit status (the command
/// is followed by `echo "status=$?"`; the echo of the typed line cannot match `status=\d`).
fn shell(vm: &mut Machine, command: &str, timeout: Duration) -> Result<(String, i32), String> {
    let status = Pattern::regex(r"status=(\d+)\r?\n").map_err(|e| e.to_string())?;
    let console = vm.console().map_err(err("console"))?;
    let found = console
        .exec_and_wait_any(
            &format!("{command}; echo \"status=$?\""),
            &[status],
            &[Pattern::substring(KERNEL_PANIC)],
            timeout,
        )
        .map_err(|e| format!("`{command}` on the console: {e}"))?;
    if found.outcome == Outcome::Failure {
        return Err(format!("kernel panic while running `{command}`"));
    }
    let matched = String::from_utf8_lossy(found.found.matched()).into_owned();
    let code: i32 = matched
        .trim()
        .trim_start_matches("status=")
        .parse()
        .map_err(|_| format!("bad status line {matched:?}"))?;
    let before = String::from_utf8_lossy(found.found.before()).into_owned();
    // Skip the echoed command line.
    let output = before.split_once('\n').map(|(_, rest)| rest).unwrap_or("");
    console
        .wait_for(&Pattern::substring(PROMPT), timeout)
        .map_err(|e| format!("prompt after `{command}`: {e}"))?;
    Ok((output.replace('\r', ""), code))
}

/// Boot to the ready line; a shell command's output and exit status; the agent over a channel
/// of our own: raw `guest-ping` loop as the baseline, then the client's ping, info, exec,
/// file read, `guest-exec` of `true`; the agent stopped (typed timeout) and continued (resync,
/// the stale reply skipped, the next call works).
fn shell_and_agent(ctx: &Ctx) -> Result<(), String> {
    let guest = guest()?;
    let mut builder = MachineBuilder::new(&ctx.qemu);
    builder
        .machine_type("q35")
        .console()
        .args(guest.qemu_args());
    let ours = agent_channel(&mut builder)?;
    let mut vm = boot(ctx, &mut builder)?;

    let (output, code) = shell(
        &mut vm,
        "cat /etc/qemu-machine-guest; sh -c 'exit 7'",
        ctx.remaining(),
    )?;
    if output != KNOWN_FILE_CONTENT || code != 7 {
        return Err(format!("shell: output {output:?}, status {code}"));
    }

    // The client and a raw loop on the same socket, interleaved round by round so the
    // machine's load hits both alike: the raw side writes the bytes of a guest-ping and reads
    // up to the reply's newline (poll, then read), with nothing else around it.
    const ROUNDS: usize = 100;
    let config = AgentConfig::default().with_command_timeout(Duration::from_secs(10));
    let raw = ours.try_clone().map_err(|e| e.to_string())?;
    let mut agent = Agent::from_unix_stream(ours, &config).map_err(|e| e.to_string())?;
    agent.ping().map_err(|e| format!("first ping: {e}"))?;
    let mut raw_times = Vec::with_capacity(ROUNDS);
    let mut client_times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        raw_ping(&raw)?;
        raw_times.push(start.elapsed());
        let start = Instant::now();
        agent.ping().map_err(|e| format!("ping: {e}"))?;
        client_times.push(start.elapsed());
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2].as_secs_f64() * 1000.0
    };
    ctx.note(format!(
        "guest-ping round trip over ISA serial, median of {ROUNDS} interleaved: client {:.2} ms, raw socket loop {:.2} ms (same channel)",
        median(&mut client_times),
        median(&mut raw_times)
    ));

    let info = agent.info().map_err(|e| format!("info: {e}"))?;
    let version = info["version"].as_str().unwrap_or("?").to_string();
    let has_exec = info["supported_commands"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["name"] == "guest-exec"));
    if !has_exec {
        return Err(format!("guest-info lists no guest-exec: {info}"));
    }
    let done = agent
        .run(
            "/bin/sh",
            &["-c", "echo out; echo err >&2; exit 5"],
            Duration::from_secs(10),
        )
        .map_err(|e| format!("exec: {e}"))?;
    if done.exit_code != Some(5) || done.stdout != b"out\n" || done.stderr != b"err\n" {
        return Err(format!("exec gave {done:?}"));
    }
    let exec_start = Instant::now();
    let done = agent
        .run("/bin/true", &[], Duration::from_secs(10))
        .map_err(|e| format!("exec true: {e}"))?;
    let exec_true = exec_start.elapsed();
    if done.exit_code != Some(0) {
        return Err(format!("true gave {done:?}"));
    }
    let content = agent
        .read_file(KNOWN_FILE)
        .map_err(|e| format!("read {KNOWN_FILE}: {e}"))?;
    if content != KNOWN_FILE_CONTENT.as_bytes() {
        return Err(format!("{KNOWN_FILE} read as {content:?}"));
    }
    let frozen = agent
        .fsfreeze_status()
        .map_err(|e| format!("fsfreeze status: {e}"))?;
    if frozen != "thawed" {
        return Err(format!("fsfreeze status {frozen:?}"));
    }
    let interfaces = agent
        .network_interfaces()
        .map_err(|e| format!("network interfaces: {e}"))?;
    let has_lo = interfaces
        .as_array()
        .is_some_and(|all| all.iter().any(|i| i["name"] == "lo"));
    if !has_lo {
        return Err(format!(
            "no lo in guest-network-get-interfaces: {interfaces}"
        ));
    }
    ctx.note(format!(
        "qemu-ga {version}; guest-exec of true end to end {:.1} ms",
        exec_true.as_secs_f64() * 1000.0
    ));

    // The agent stops answering: a typed timeout within the deadline.
    shell(&mut vm, "kill -STOP $(pidof qemu-ga)", ctx.remaining())?;
    let stale_before = agent.stale_replies();
    let asked = Instant::now();
    match agent.execute_with_timeout("guest-ping", None, Duration::from_millis(500)) {
        Err(QmpError::CommandTimeout { command, .. }) if command == "guest-ping" => {}
        other => return Err(format!("ping to a stopped agent: {other:?}")),
    }
    let waited = asked.elapsed();
    if waited > Duration::from_millis(900) {
        return Err(format!("the timeout of 500 ms took {waited:?}"));
    }
    // Out of sync now: the next call syncs first, and its sync attempts (one every 500 ms,
    // each with a new id) go unanswered too.
    match agent.execute_with_timeout("guest-ping", None, Duration::from_millis(1200)) {
        Err(QmpError::CommandTimeout { command, .. }) if command == "guest-sync-delimited" => {}
        other => return Err(format!("sync with a stopped agent: {other:?}")),
    }
    // Back: the agent answers everything queued (the old ping and the old syncs, each sync
    // answer after its own 0xFF); the next call skips those by their ids and works.
    shell(&mut vm, "kill -CONT $(pidof qemu-ga)", ctx.remaining())?;
    agent
        .ping()
        .map_err(|e| format!("ping after the agent continued: {e}"))?;
    let skipped = agent.stale_replies() - stale_before;
    if skipped == 0 {
        return Err("no answer of an earlier sync was seen and skipped".into());
    }
    ctx.note(format!(
        "stopped agent: timeout after {:.0} ms (asked 500); after SIGCONT {skipped} stale sync answers skipped by id, next ping ok",
        waited.as_secs_f64() * 1000.0
    ));
    vm.shutdown().map_err(err("shutdown"))?;
    Ok(())
}

/// Adds the agent's ISA-serial channel by hand (not `MachineBuilder::guest_agent`) and returns
/// our end, so a raw loop and the client can use the same socket, one after the other.
pub(crate) fn agent_channel(
    builder: &mut MachineBuilder,
) -> Result<std::os::unix::net::UnixStream, String> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    let fd = builder.pass_fd(OwnedFd::from(theirs));
    builder.args([
        "-chardev".to_string(),
        format!("socket,id=qga0,fd={fd}"),
        "-device".to_string(),
        "isa-serial,chardev=qga0".to_string(),
    ]);
    Ok(ours)
}

/// One raw `guest-ping` on the agent socket (nonblocking, as the client set it): write, then
/// poll and read until a whole reply line. Line ends left over from the client's previous
/// reply (the client returns at the closing brace) are skipped, not taken for the reply.
pub(crate) fn raw_ping(stream: &std::os::unix::net::UnixStream) -> Result<(), String> {
    use std::io::Read;
    use std::os::fd::AsFd;
    (&*stream)
        .write_all(b"{\"execute\":\"guest-ping\",\"id\":1}")
        .map_err(|e| format!("raw write: {e}"))?;
    let mut got: Vec<u8> = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let mut fds = [nix::poll::PollFd::new(
            stream.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16))
            .map_err(|e| format!("raw poll: {e}"))?;
        if ready == 0 {
            return Err("raw ping: no reply within 10 s".into());
        }
        match (&*stream).read(&mut buf) {
            Ok(0) => return Err("raw ping: channel closed".into()),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                let start = got.iter().position(|b| !b.is_ascii_whitespace());
                if let Some(start) = start {
                    if got[start..].contains(&b'\n') {
                        return Ok(());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("raw read: {e}")),
        }
    }
}

/// `device_add` into the hotplug root port, seen by the guest (through the agent of the
/// builder option), `device_del` answered by DEVICE_DELETED through `execute_and_wait`, then
/// `system_powerdown`: a clean guest power-off (SHUTDOWN with guest: true, QEMU exits 0).
fn hotplug_and_powerdown(ctx: &Ctx) -> Result<(), String> {
    let guest = guest()?;
    let mut builder = MachineBuilder::new(&ctx.qemu);
    guest.configure(&mut builder);
    let mut vm = boot(ctx, &mut builder)?;
    let vendor = "/sys/bus/pci/devices/0000:01:00.0/vendor";
    vm.cmd(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "rng0", "bus": HOTPLUG_PORT}),
    )
    .map_err(err("device_add"))?;
    let seen_by_guest = |vm: &mut Machine| -> Result<bool, String> {
        let agent = vm.agent().map_err(err("agent"))?;
        let done = agent
            .run("/bin/cat", &[vendor], Duration::from_secs(10))
            .map_err(|e| format!("cat {vendor}: {e}"))?;
        Ok(done.exit_code == Some(0) && done.stdout.starts_with(b"0x1af4"))
    };
    let added = Instant::now();
    while !seen_by_guest(&mut vm)? {
        if added.elapsed() > Duration::from_secs(10) {
            return Err(format!("the guest has no {vendor} 10 s after device_add"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = added.elapsed();
    let removed = Instant::now();
    let filter =
        EventFilter::new("DEVICE_DELETED").with_pattern(json!({"data": {"device": "rng0"}}));
    let (_, event) = vm
        .qmp_connection()
        .map_err(err("qmp"))?
        .execute_and_wait(
            "device_del",
            serde_json::from_value(json!({"id": "rng0"})).ok(),
            &[filter],
            Duration::from_secs(30),
        )
        .map_err(|e| format!("device_del: {e}"))?;
    let deleted = removed.elapsed();
    if seen_by_guest(&mut vm)? {
        return Err(format!(
            "the guest still has {vendor} after {}",
            event.event
        ));
    }
    ctx.note(format!(
        "hotplug: guest sees the device {:.0} ms after device_add; device_del -> DEVICE_DELETED {:.0} ms",
        seen.as_secs_f64() * 1000.0,
        deleted.as_secs_f64() * 1000.0
    ));

    let asked = Instant::now();
    vm.cmd("system_powerdown", ())
        .map_err(err("system_powerdown"))?;
    let shutdown = vm
        .event_wait("SHUTDOWN", None, Duration::from_secs(30))
        .map_err(err("SHUTDOWN"))?;
    let took = asked.elapsed();
    let data = shutdown.data.clone().unwrap_or_default();
    if data["guest"] != true || data["reason"] != "guest-shutdown" {
        return Err(format!("SHUTDOWN data {data}"));
    }
    let report = vm.wait(Duration::from_secs(30)).map_err(err("wait"))?;
    if !report.status.success() || !matches!(report.ended_by, EndedBy::Guest { .. }) {
        return Err(format!("after powerdown: {report}"));
    }
    let console_saw = report
        .console_tail
        .iter()
        .any(|l| l.contains("power button, powering off"));
    if !console_saw {
        return Err("the guest's power-button script did not run".into());
    }
    ctx.note(format!(
        "system_powerdown -> SHUTDOWN {{guest: true}} {:.0} ms",
        took.as_secs_f64() * 1000.0
    ));
    Ok(())
}

/// `echo c > /proc/sysrq-trigger` on the console: the failure pattern reports the panic
/// within a second, not at the deadline.
fn panic_pattern(ctx: &Ctx) -> Result<(), String> {
    let guest = guest()?;
    let mut builder = MachineBuilder::new(&ctx.qemu);
    guest.configure(&mut builder);
    let mut vm = boot(ctx, &mut builder)?;
    let console = vm.console().map_err(err("console"))?;
    let sent = Instant::now();
    let found = console
        .exec_and_wait_any(
            "echo c > /proc/sysrq-trigger",
            &[Pattern::substring(PROMPT)],
            &[Pattern::substring(KERNEL_PANIC)],
            Duration::from_secs(30),
        )
        .map_err(|e| format!("waiting for the panic: {e}"))?;
    let took = sent.elapsed();
    if found.outcome != Outcome::Failure {
        return Err(format!(
            "the prompt came back instead of a panic: {:?}",
            found.found.text_lossy()
        ));
    }
    if took > Duration::from_secs(1) {
        return Err(format!("the panic was reported after {took:?}"));
    }
    ctx.note(format!(
        "sysrq crash -> `{KERNEL_PANIC}` matched {:.0} ms after sending",
        took.as_secs_f64() * 1000.0
    ));
    vm.kill().map_err(err("kill"))?;
    Ok(())
}
