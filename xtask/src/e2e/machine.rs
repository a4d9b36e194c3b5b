//! End-to-end scenarios for the machine area: every parity behaviour of `machine_core::Machine`
//! against the real `qemu-system-x86_64` (`-M none` where no guest is needed, the tiny guest
//! where one is).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use machine_core::console_socket::Pattern;
use machine_core::guest::{self, GuestMachine};
use machine_core::qmp_proto::EventFilter;
use machine_core::{
    Args, EndedBy, Error, ExitStatus, Fleet, Machine, MachineBuilder, MemberId, Monitor,
    ShutdownLadder, Step, StepOutcome,
};
use serde_json::json;

use super::{check, Accel, Ctx, Scenario};

const TCG: &[Accel] = &[Accel::Tcg];
const BOTH: &[Accel] = &[Accel::Tcg, Accel::Kvm];

/// The scenarios of this area.
pub fn scenarios() -> Vec<Scenario> {
    let s = |name, accels, secs, run| Scenario {
        name,
        accels,
        timeout: Duration::from_secs(secs),
        run,
    };
    vec![
        s(
            "machine_launch_cmd_qmp_shutdown",
            BOTH,
            30,
            launch_cmd_qmp_shutdown,
        ),
        s("machine_events_and_waits", BOTH, 30, events_and_waits),
        s("machine_key_conversion_and_exact", TCG, 30, key_conversion),
        s("machine_kill", TCG, 30, kill),
        s(
            "machine_stepped_three_from_one_poll",
            BOTH,
            60,
            stepped_three_from_one_poll,
        ),
        s("machine_shared_qmp_handle", TCG, 30, shared_qmp_handle),
        s("machine_relaunch", TCG, 30, relaunch),
        s("machine_fleet_kill_and_stop", TCG, 60, fleet_kill_and_stop),
        s(
            "machine_tiny_guest_builder_relaunch",
            TCG,
            30,
            tiny_guest_relaunch,
        ),
        s("machine_no_qmp_sigterm_and_log", TCG, 30, no_qmp_sigterm),
        s("machine_add_fd", TCG, 30, add_fd),
        s("machine_send_fd_scm", TCG, 30, send_fd_scm),
        s("machine_launch_failure_bad_args", TCG, 30, launch_failure),
        s("machine_unix_monitor", TCG, 30, unix_monitor),
        s("machine_tcp_monitor", TCG, 30, tcp_monitor),
        s("machine_log_dir_kept", TCG, 30, log_dir_kept),
        s("machine_drop_kills_and_cleans", TCG, 30, drop_kills),
        s("machine_no_fd_leak_into_qemu", TCG, 30, no_fd_leak),
        s("machine_external_signal", TCG, 30, external_signal),
        s("machine_escalating_ladder", TCG, 30, escalating_ladder),
        s(
            "machine_guest_console_echo_flood_exit",
            TCG,
            60,
            guest_console,
        ),
        s("machine_guest_poweroff_wait", TCG, 60, guest_poweroff_wait),
        s(
            "machine_guest_powerdown_ladder",
            TCG,
            60,
            guest_powerdown_ladder,
        ),
        s(
            "machine_shutdown_event_alone_never_kills",
            TCG,
            60,
            no_shutdown_event,
        ),
        s(
            "machine_unread_console_flood_never_blocks",
            TCG,
            60,
            console_flood_unread,
        ),
    ]
}

fn err(what: &str) -> impl FnOnce(Error) -> String + '_ {
    move |e| format!("{what}: {}", chain(&e))
}

/// The error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn remaining(ctx: &Ctx) -> Duration {
    ctx.deadline.saturating_duration_since(Instant::now())
}

/// A fresh private base dir for temp dirs, so leftovers can be counted.
fn base_dir() -> Result<tempfile::TempDir, String> {
    tempfile::Builder::new()
        .prefix("e2e-machine-")
        .tempdir()
        .map_err(|e| format!("base dir: {e}"))
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

/// `-M none` with the scenario's accelerator.
fn none_builder(ctx: &Ctx, base: &Path) -> MachineBuilder {
    let mut b = MachineBuilder::new(&ctx.qemu);
    b.machine_type("none")
        .args(["-nodefaults", "-accel", ctx.accel.as_str()])
        .base_temp_dir(base)
        .greeting_timeout(Duration::from_secs(10))
        .command_timeout(Duration::from_secs(10));
    b
}

/// The tiny guest on q35 with a console, kernel written into the machine's temp dir.
fn guest_machine(ctx: &Ctx, base: &Path, extra: &[&str]) -> Result<Machine, String> {
    guest_machine_with(ctx, base, extra, Monitor::SocketPair)
}

fn guest_machine_with(
    ctx: &Ctx,
    base: &Path,
    extra: &[&str],
    monitor: Monitor,
) -> Result<Machine, String> {
    let mut b = MachineBuilder::new(&ctx.qemu);
    b.monitor(monitor);
    b.tiny_guest(GuestMachine::Q35)
        .args(["-accel", ctx.accel.as_str()])
        .args(extra.iter().copied())
        .base_temp_dir(base)
        .greeting_timeout(Duration::from_secs(10));
    Ok(b.build())
}

/// `MachineBuilder::tiny_guest` boots the guest again on the same machine after an exit (the
/// kernel is written into each launch's temp dir).
fn tiny_guest_relaunch(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = guest_machine(ctx, base.path(), &[])?;
    for round in 0..2 {
        m.launch().map_err(err("launch"))?;
        wait_banner(&mut m, ctx).map_err(|e| format!("round {round}: {e}"))?;
        let report = m.shutdown().map_err(err("shutdown"))?;
        check(
            report.ended_by == EndedBy::Quit && report.clean(),
            format!("round {round}: {}", report.summary()),
        )?;
    }
    Ok(())
}

fn wait_banner(m: &mut Machine, ctx: &Ctx) -> Result<(), String> {
    let console = m.console().map_err(err("console"))?;
    console
        .wait_for(
            &Pattern::substring(guest::PROMPT),
            remaining(ctx).min(Duration::from_secs(20)),
        )
        .map_err(|e| format!("banner: {}", chain(&e)))?;
    Ok(())
}

fn launch_cmd_qmp_shutdown(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = none_builder(ctx, base.path()).build();
    m.launch().map_err(err("launch"))?;
    check(m.is_running(), "running after launch")?;
    check(m.pid().is_some(), "pid while running")?;
    let status = m.cmd("query-status", ()).map_err(err("query-status"))?;
    check(status["status"] == "running", format!("status {status}"))?;
    // qmp(): the whole reply, errors as data.
    let raw = m.qmp("no-such-command", ()).map_err(err("qmp"))?;
    check(
        raw["error"]["class"] == "CommandNotFound",
        format!("raw error reply {raw}"),
    )?;
    let raw = m.qmp("query-status", ()).map_err(err("qmp"))?;
    check(
        raw["return"]["status"] == "running",
        format!("raw reply {raw}"),
    )?;
    // cmd(): a QMP error is a typed error.
    match m.cmd("no-such-command", ()) {
        Err(Error::Command { class, command, .. }) => check(
            class == "CommandNotFound" && command == "no-such-command",
            "error class",
        )?,
        other => return Err(format!("cmd of an unknown command: {other:?}")),
    }
    let temp = m.temp_dir().map_err(err("temp dir"))?.to_path_buf();
    check(temp.exists(), "temp dir exists while running")?;
    let report = m.shutdown().map_err(err("shutdown"))?;
    check(
        report.ended_by == EndedBy::Quit,
        format!("ended by {}", report.ended_by),
    )?;
    check(
        report.status == ExitStatus::Code(0),
        format!("status {}", report.status),
    )?;
    check(
        report
            .shutdown_event
            .as_ref()
            .is_some_and(|e| !e.guest && e.reason == "host-qmp-quit"),
        format!("shutdown event {:?}", report.shutdown_event),
    )?;
    check(report.steps.len() == 1, format!("steps {:?}", report.steps))?;
    check(
        !m.is_running() && m.pid().is_none(),
        "not running after shutdown",
    )?;
    check(m.exit_status() == Some(ExitStatus::Code(0)), "exit status")?;
    check(m.log().is_some(), "log after exit")?;
    check(!temp.exists(), "temp dir removed")?;
    check(entries(base.path()) == 0, "nothing left in the base dir")?;
    // Idempotent: a second shutdown returns the same report.
    let again = m.shutdown().map_err(err("second shutdown"))?;
    check(again.status == report.status, "second shutdown report")?;
    Ok(())
}

/// `Machine::qmp_shared`: another thread commands QEMU and takes events through the shared
/// handle while the machine keeps working; the ladder ends QEMU through it.
fn shared_qmp_handle(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = none_builder(ctx, base.path()).build();
    m.launch().map_err(err("launch"))?;
    let mut qmp = m.qmp_shared().map_err(err("qmp_shared"))?;
    let watcher = {
        let mut qmp = qmp.clone();
        std::thread::spawn(move || {
            qmp.wait_event(&[EventFilter::new("STOP")], Duration::from_secs(5))
                .map_err(|e| format!("STOP on the other thread: {e}"))?;
            qmp.execute("cont", None)
                .map_err(|e| format!("cont from the other thread: {e}"))
        })
    };
    m.cmd("stop", ()).map_err(err("stop"))?;
    watcher
        .join()
        .map_err(|_| "watcher thread panicked".to_string())??;
    let status = m.cmd("query-status", ()).map_err(err("query-status"))?;
    check(status["status"] == "running", format!("status {status}"))?;
    check(
        matches!(m.qmp_connection(), Err(Error::QmpShared)),
        "qmp_connection on a shared run",
    )?;
    let report = m.shutdown().map_err(err("shutdown"))?;
    check(
        report.ended_by == EndedBy::Quit,
        format!("ended by {}", report.ended_by),
    )?;
    check(
        qmp.execute("query-status", None).is_err(),
        "handle after exit",
    )?;
    check(entries(base.path()) == 0, "temp dir left")?;
    Ok(())
}

fn events_and_waits(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = none_builder(ctx, base.path()).build();
    m.launch().map_err(err("launch"))?;
    m.cmd("stop", ()).map_err(err("stop"))?;
    m.cmd("cont", ()).map_err(err("cont"))?;
    m.cmd("system_reset", ()).map_err(err("system_reset"))?;
    // event_wait with a pattern skips STOP and RESUME and leaves them queued, in order.
    let reset = m
        .event_wait(
            "RESET",
            Some(json!({"data": {"reason": "host-qmp-system-reset"}})),
            Duration::from_secs(5),
        )
        .map_err(err("event_wait RESET"))?;
    check(reset.event == "RESET", "RESET")?;
    let first = m.event(Duration::ZERO).map_err(err("event"))?;
    check(
        first.as_ref().is_some_and(|e| e.event == "STOP"),
        format!("oldest first: {first:?}"),
    )?;
    let rest: Vec<String> = m.events().into_iter().map(|e| e.event).collect();
    check(rest == ["RESUME"], format!("remaining events {rest:?}"))?;
    // events_wait: any of several.
    m.cmd("stop", ()).map_err(err("stop"))?;
    let ev = m
        .events_wait(
            &[EventFilter::new("RESUME"), EventFilter::new("STOP")],
            Duration::from_secs(5),
        )
        .map_err(err("events_wait"))?;
    check(ev.event == "STOP", "events_wait STOP")?;
    // A total deadline, not reset by non-matching events.
    let started = Instant::now();
    m.cmd("cont", ()).map_err(err("cont"))?;
    match m.event_wait("NEVER", None, Duration::from_millis(300)) {
        Err(Error::Qmp {
            source: machine_core::qmp_client::Error::EventTimeout { .. },
            ..
        }) => {}
        other => return Err(format!("event_wait NEVER: {other:?}")),
    }
    let waited = started.elapsed();
    check(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(1500),
        format!("waited {waited:?}"),
    )?;
    // The RESUME is still there.
    let ev = m.event(Duration::from_secs(1)).map_err(err("event"))?;
    check(ev.is_some_and(|e| e.event == "RESUME"), "RESUME kept")?;
    let report = m.shutdown().map_err(err("shutdown"))?;
    check(
        report.last_events.iter().any(|e| e.event == "SHUTDOWN"),
        "last events include SHUTDOWN",
    )?;
    // Events left over after the exit can still be read.
    let left: Vec<String> = m.events().into_iter().map(|e| e.event).collect();
    check(
        left.contains(&"SHUTDOWN".to_owned()),
        format!("leftovers {left:?}"),
    )?;
    Ok(())
}

fn key_conversion(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = none_builder(ctx, base.path()).build();
    m.launch().map_err(err("launch"))?;
    // `node_name` becomes `node-name` by default...
    m.cmd(
        "blockdev-add",
        json!({"driver": "null-co", "node_name": "n0", "size": 16 << 20}),
    )
    .map_err(err("blockdev-add converted"))?;
    let nodes = m.cmd("query-named-block-nodes", ()).map_err(err("query"))?;
    check(
        nodes
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["node-name"] == "n0")),
        format!("node n0 in {nodes}"),
    )?;
    // ...and stays `node_name` with Args::exact, which QEMU refuses.
    match m.cmd(
        "blockdev-add",
        Args::exact(json!({"driver": "null-co", "node_name": "n1"})),
    ) {
        Err(Error::Command { class, desc, .. }) => check(
            class == "GenericError" && desc.contains("node_name"),
            format!("{class}: {desc}"),
        )?,
        other => return Err(format!("exact arguments: {other:?}")),
    }
    m.shutdown().map_err(err("shutdown"))?;
    Ok(())
}

fn kill(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = none_builder(ctx, base.path()).build();
    m.launch().map_err(err("launch"))?;
    let report = m.kill().map_err(err("kill"))?;
    check(
        report.ended_by == EndedBy::Kill,
        format!("ended by {}", report.ended_by),
    )?;
    check(
        report.status.signal() == Some(libc::SIGKILL),
        format!("status {}", report.status),
    )?;
    check(
        matches!(report.steps.as_slice(), [r] if matches!(r.step, Step::Kill { .. }) && r.outcome == StepOutcome::Exited),
        format!("steps {:?}", report.steps),
    )?;
    check(entries(base.path()) == 0, "cleaned up")?;
    Ok(())
}

/// The names of this process's threads (`/proc/self/task/*/comm`).
fn thread_names() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim_end().to_owned())
        .collect()
}

/// Steps `machines` on one `mio::Poll` in this thread until `done` holds for each (events
/// route by token: `3i`, `3i + 1` and `3i + 2` are machine `i`'s).
fn drive_stepped(
    poll: &mut mio::Poll,
    machines: &mut [Machine],
    deadline: Instant,
    what: &str,
    mut done: impl FnMut(usize, &mut Machine) -> bool,
) -> Result<(), String> {
    let mut events = mio::Events::with_capacity(64);
    loop {
        let mut all = true;
        for (i, m) in machines.iter_mut().enumerate() {
            all &= done(i, m);
        }
        if all {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let states: Vec<_> = machines.iter().map(Machine::state).collect();
            return Err(format!("{what}: not there in time: {states:?}"));
        }
        let busy = machines.iter_mut().any(Machine::wants_step);
        let next = machines
            .iter()
            .filter_map(Machine::next_deadline)
            .fold(deadline, Instant::min);
        let timeout = if busy {
            Duration::ZERO
        } else {
            next.saturating_duration_since(Instant::now())
        };
        poll.poll(&mut events, Some(timeout))
            .map_err(|e| format!("poll: {e}"))?;
        let mut woken = vec![busy; machines.len()];
        for event in events.iter() {
            if let Some(w) = woken.get_mut(event.token().0 / 3) {
                *w = true;
            }
        }
        let now = Instant::now();
        for (i, m) in machines.iter_mut().enumerate() {
            if woken[i] || m.next_deadline().is_some_and(|d| d <= now) {
                m.step().map_err(err("step"))?;
            }
        }
    }
}

/// Three real QEMUs driven from one `mio::Poll` in this thread: stepped launch, a command in
/// flight on each, an event wait (STOP after `stop`), and the shutdown ladder; the machines
/// add no thread (QMP, exit supervision and QEMU's output are all on this poll).
fn stepped_three_from_one_poll(ctx: &Ctx) -> Result<(), String> {
    use machine_core::qmp_client::RequestId;
    use machine_core::{MachineState, Tokens};
    let base = base_dir()?;
    let deadline = ctx.deadline.min(Instant::now() + Duration::from_secs(50));
    let before = thread_names();
    let mut poll = mio::Poll::new().map_err(|e| format!("poll: {e}"))?;
    // Machine 0 is the tiny guest, its console on the poll too; 1 and 2 are `-M none`.
    let mut machines: Vec<Machine> = vec![guest_machine(ctx, base.path(), &[])?];
    for i in 1..3 {
        let mut b = none_builder(ctx, base.path());
        b.name(format!("step{i}"));
        machines.push(b.build());
    }
    for (i, m) in machines.iter_mut().enumerate() {
        m.launch_begin().map_err(err("launch_begin"))?;
        m.register(
            poll.registry(),
            Tokens {
                exit: mio::Token(3 * i),
                qmp: mio::Token(3 * i + 1),
                output: mio::Token(3 * i + 2),
            },
        )
        .map_err(err("register"))?;
    }
    // `drive_stepped` finds the machine by `token / 3`: the console shares the output's.
    machines[0]
        .register_console(poll.registry(), mio::Token(2))
        .map_err(err("register_console"))?;
    let banner = Pattern::substring(guest::BANNER);
    let mut booted = false;
    drive_stepped(&mut poll, &mut machines, deadline, "launch", |i, m| {
        if i == 0 && !booted {
            // On the polling thread: look, never wait.
            booted = m
                .console()
                .is_ok_and(|c| c.wait_for(&banner, Duration::ZERO).is_ok());
        }
        (i != 0 || booted) && m.state() == MachineState::Running
    })?;
    let mut added: Vec<String> = thread_names();
    for name in &before {
        if let Some(pos) = added.iter().position(|n| n == name) {
            added.remove(pos);
        }
    }
    check(
        added.is_empty(),
        format!("threads the three machines added: {added:?} (none expected)"),
    )?;

    let mut pending: Vec<Option<RequestId>> = Vec::new();
    for m in machines.iter_mut() {
        pending.push(Some(m.submit("query-status", ()).map_err(err("submit"))?));
    }
    let mut statuses = vec![String::new(); 3];
    drive_stepped(
        &mut poll,
        &mut machines,
        deadline,
        "query-status",
        |i, m| {
            let Some(id) = pending[i] else {
                return true;
            };
            match m.take_reply(id) {
                None => false,
                Some(reply) => {
                    statuses[i] = match reply {
                        Ok(v) => v["return"]["status"].as_str().unwrap_or("?").to_owned(),
                        Err(e) => format!("error: {e}"),
                    };
                    pending[i] = None;
                    true
                }
            }
        },
    )?;
    check(
        statuses.iter().all(|s| s == "running"),
        format!("statuses {statuses:?}"),
    )?;

    // An event wait: `stop` on each, then its STOP event.
    for m in machines.iter_mut() {
        m.submit("stop", ()).map_err(err("stop"))?;
    }
    let mut stopped = [false; 3];
    drive_stepped(&mut poll, &mut machines, deadline, "STOP event", |i, m| {
        stopped[i] |= m.take_event(&[EventFilter::new("STOP")]).is_some();
        stopped[i]
    })?;

    // Running again (the guest must see the power button), each RESUME taken as it comes.
    for m in machines.iter_mut() {
        m.submit("cont", ()).map_err(err("cont"))?;
    }
    let mut resumed = [false; 3];
    drive_stepped(
        &mut poll,
        &mut machines,
        deadline,
        "RESUME event",
        |i, m| {
            resumed[i] |= m.take_event(&[EventFilter::new("RESUME")]).is_some();
            resumed[i]
        },
    )?;

    // The ladder: system_powerdown (the guest powers off; -M none ignores it), then quit.
    let ladder = |powerdown: Duration| {
        ShutdownLadder::new([
            Step::Powerdown { timeout: powerdown },
            Step::Quit {
                timeout: Duration::from_secs(10),
            },
        ])
    };
    for (i, m) in machines.iter_mut().enumerate() {
        let powerdown = match i {
            0 => Duration::from_secs(10),
            _ => Duration::from_millis(300),
        };
        m.shutdown_begin(&ladder(powerdown))
            .map_err(err("shutdown_begin"))?;
    }
    drive_stepped(&mut poll, &mut machines, deadline, "ladder", |_, m| {
        m.state() == MachineState::Exited
    })?;
    for (i, m) in machines.iter_mut().enumerate() {
        let report = m.exit_report().ok_or("no exit report")?.clone();
        let (ended, steps) = match i {
            0 => (
                matches!(report.ended_by, EndedBy::Powerdown { .. }),
                report.steps.len() == 1,
            ),
            _ => (
                report.ended_by == EndedBy::Quit,
                report.steps.len() == 2 && report.steps[0].outcome == StepOutcome::TimedOut,
            ),
        };
        check(
            ended && report.status == ExitStatus::Code(0),
            format!("machine {i} report: {report}"),
        )?;
        check(steps, format!("machine {i} steps: {:?}", report.steps))?;
    }
    // The guest's power-off lines, drained from the poll up to QEMU's end.
    let rest = machines[0]
        .console()
        .map_err(err("console"))?
        .read_available();
    check(
        String::from_utf8_lossy(&rest).contains(guest::POWEROFF_LINE),
        format!(
            "console after the exit: {:?}",
            String::from_utf8_lossy(&rest)
        ),
    )?;
    check(entries(base.path()) == 0, "cleaned up")?;
    Ok(())
}

fn relaunch(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = none_builder(ctx, base.path()).build();
    let mut pids = Vec::new();
    for round in 0..3 {
        m.launch().map_err(err("launch"))?;
        match m.launch() {
            Err(Error::AlreadyRunning { .. }) => {}
            other => return Err(format!("second launch while running: {other:?}")),
        }
        pids.push(m.pid().ok_or("pid")?);
        let status = m.cmd("query-status", ()).map_err(err("query-status"))?;
        check(
            status["status"] == "running",
            format!("round {round}: {status}"),
        )?;
        m.shutdown().map_err(err("shutdown"))?;
        check(
            entries(base.path()) == 0,
            format!("round {round}: cleaned up"),
        )?;
    }
    check(pids[0] != pids[1] && pids[1] != pids[2], "three processes")?;
    Ok(())
}

fn no_qmp_sigterm(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    // Without QMP, the guest's banner on the console is what says QEMU is up (and has its
    // signal handlers installed).
    let mut m = guest_machine_with(ctx, base.path(), &[], Monitor::None)?;
    m.launch().map_err(err("launch"))?;
    check(
        matches!(m.cmd("query-status", ()), Err(Error::NoMonitor)),
        "no monitor",
    )?;
    let cl = m.command_line().map(|c| c.to_string()).unwrap_or_default();
    check(
        !cl.contains("-mon "),
        format!("no monitor on the command line: {cl}"),
    )?;
    wait_banner(&mut m, ctx)?;
    let report = m.shutdown().map_err(err("shutdown"))?;
    check(
        report.ended_by
            == EndedBy::OurSignal {
                signal: libc::SIGTERM,
            },
        format!("ended by {}", report.ended_by),
    )?;
    check(
        report.status == ExitStatus::Code(0),
        format!("status {}", report.status),
    )?;
    // QEMU says so on stderr, which we captured.
    let log = m.log().unwrap_or_default();
    check(
        log.contains("terminating on signal 15"),
        format!("log {log:?}"),
    )?;
    Ok(())
}

fn add_fd(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let file = tempfile::tempfile().map_err(|e| e.to_string())?;
    let mut b = none_builder(ctx, base.path());
    let n = b
        .add_fd(&file, 7, Some("hello,world"), "")
        .map_err(err("add_fd"))?;
    let mut m = b.build();
    m.launch().map_err(err("launch"))?;
    let sets = m.cmd("query-fdsets", ()).map_err(err("query-fdsets"))?;
    let set = sets
        .as_array()
        .and_then(|a| a.iter().find(|s| s["fdset-id"] == 7))
        .ok_or(format!("fdset 7 in {sets}"))?;
    check(
        set["fds"][0]["opaque"] == "hello,world",
        format!("opaque in {set}"),
    )?;
    // QEMU reports its own duplicate's number; ours must have reached it, which the fdset
    // proves. `n` is the number QEMU was told on its command line.
    let cl = m.command_line().map(|c| c.to_string()).unwrap_or_default();
    check(
        cl.contains(&format!("-add-fd fd={n},set=7,opaque=hello,,world")),
        format!("command line {cl}"),
    )?;
    m.shutdown().map_err(err("shutdown"))?;
    // The fd is kept for the next launch.
    m.launch().map_err(err("relaunch"))?;
    let sets = m.cmd("query-fdsets", ()).map_err(err("query-fdsets"))?;
    check(
        sets.to_string().contains("hello,world"),
        "fdset after relaunch",
    )?;
    m.shutdown().map_err(err("shutdown"))?;
    Ok(())
}

fn send_fd_scm(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = none_builder(ctx, base.path()).build();
    m.launch().map_err(err("launch"))?;
    // getfd without a passed fd fails...
    check(
        matches!(
            m.cmd("getfd", json!({"fdname": "f0"})),
            Err(Error::Command { .. })
        ),
        "getfd without an fd",
    )?;
    // ...and works after send_fd_scm (fd) and send_fd_scm_path (path).
    let file = tempfile::tempfile().map_err(|e| e.to_string())?;
    use std::os::fd::AsFd;
    m.send_fd_scm(file.as_fd()).map_err(err("send_fd_scm"))?;
    m.cmd("getfd", json!({"fdname": "f0"}))
        .map_err(err("getfd f0"))?;
    m.send_fd_scm_path(Path::new("/dev/null"))
        .map_err(err("send_fd_scm_path"))?;
    m.cmd("getfd", json!({"fdname": "f1"}))
        .map_err(err("getfd f1"))?;
    m.cmd("closefd", json!({"fdname": "f0"}))
        .map_err(err("closefd"))?;
    m.getfd("f2", file.as_fd()).map_err(err("getfd helper"))?;
    m.shutdown().map_err(err("shutdown"))?;
    Ok(())
}

fn launch_failure(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut b = none_builder(ctx, base.path());
    b.args(["-device", "no-such-device-xyz"]);
    let mut m = b.build();
    let started = Instant::now();
    let e = m
        .launch()
        .err()
        .ok_or("launch with a bad device succeeded")?;
    let took = started.elapsed();
    match &e {
        Error::LaunchFailed {
            status,
            killed,
            command,
            output,
            ..
        } => {
            check(
                *status == Some(ExitStatus::Code(1)),
                format!("status {status:?}"),
            )?;
            check(!killed, "exited by itself")?;
            check(
                command.contains("no-such-device-xyz"),
                format!("command {command}"),
            )?;
            check(
                output.contains("no-such-device-xyz"),
                format!("output {output:?}"),
            )?;
        }
        other => return Err(format!("expected LaunchFailed, got {}", chain(other))),
    }
    check(took < Duration::from_secs(3), format!("took {took:?}"))?;
    check(!m.is_running() && m.pid().is_none(), "nothing running")?;
    check(entries(base.path()) == 0, "rolled back")?;
    check(
        m.log().is_some_and(|l| l.contains("no-such-device-xyz")),
        "log() after a failed launch",
    )?;
    Ok(())
}

fn unix_monitor(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let path = base.path().join("mon,server=on.sock");
    let mut b = none_builder(ctx, base.path());
    b.monitor(Monitor::Unix(path.clone()));
    let mut m = b.build();
    m.launch().map_err(err("launch"))?;
    let status = m.cmd("query-status", ()).map_err(err("query-status"))?;
    check(status["status"] == "running", "running")?;
    m.send_fd_scm_path(Path::new("/dev/null"))
        .map_err(err("send_fd_scm over a unix path"))?;
    m.cmd("getfd", json!({"fdname": "x"}))
        .map_err(err("getfd"))?;
    m.shutdown().map_err(err("shutdown"))?;
    check(!path.exists(), "socket path removed")?;
    check(entries(base.path()) == 0, "cleaned up")?;
    // Too long a path is refused before anything starts.
    let long = PathBuf::from(format!("/tmp/{}", "x".repeat(110)));
    let mut b = none_builder(ctx, base.path());
    b.monitor(Monitor::Unix(long));
    match b.build().launch() {
        Err(Error::SocketPathTooLong { limit: 107, .. }) => {}
        other => return Err(format!("long path: {other:?}")),
    }
    Ok(())
}

fn tcp_monitor(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut b = none_builder(ctx, base.path());
    b.monitor(Monitor::Tcp(
        "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
    ));
    let mut m = b.build();
    m.launch().map_err(err("launch"))?;
    let status = m.cmd("query-status", ()).map_err(err("query-status"))?;
    check(status["status"] == "running", "running")?;
    let cl = m.command_line().map(|c| c.to_string()).unwrap_or_default();
    check(
        cl.contains("host=127.0.0.1,port="),
        format!("command line {cl}"),
    )?;
    let report = m.shutdown().map_err(err("shutdown"))?;
    check(report.ended_by == EndedBy::Quit, "quit")?;
    Ok(())
}

fn log_dir_kept(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let logs = base_dir()?;
    let mut b = none_builder(ctx, base.path());
    b.log_dir(logs.path()).name("vm,1");
    let mut m = b.build();
    m.launch().map_err(err("launch"))?;
    let pid = m.pid().ok_or("pid")?;
    // Someone else's SIGTERM makes QEMU write to stderr and exit.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|e| e.to_string())?;
    let report = m.wait(Duration::from_secs(10)).map_err(err("wait"))?;
    check(
        report.ended_by
            == EndedBy::Host {
                reason: "host-signal".into(),
            },
        format!("ended by {}", report.ended_by),
    )?;
    let file = logs.path().join("vm,1.log");
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    check(
        text.contains("terminating on signal 15"),
        format!("log file {text:?}"),
    )?;
    check(m.log() == Some(text.as_str()), "log() equals the file")?;
    check(
        report
            .output_tail
            .iter()
            .any(|l| l.contains("terminating on signal 15")),
        "report output tail",
    )?;
    Ok(())
}

fn drop_kills(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = none_builder(ctx, base.path()).build();
    m.launch().map_err(err("launch"))?;
    let pid = m.pid().ok_or("pid")?;
    drop(m);
    let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err();
    check(gone, format!("pid {pid} still exists after drop"))?;
    check(entries(base.path()) == 0, "temp dir removed on drop")?;
    Ok(())
}

fn fd_targets(pid: u32) -> Result<Vec<(i32, String)>, String> {
    let dir = format!("/proc/{pid}/fd");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let n: i32 = entry
            .file_name()
            .to_string_lossy()
            .parse()
            .map_err(|_| "fd name")?;
        let target = std::fs::read_link(entry.path())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push((n, target));
    }
    Ok(out)
}

fn no_fd_leak(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    // An inheritable (non-close-on-exec) pipe in our process: Python's close_fds=False would
    // hand it to QEMU.
    let (leak_r, leak_w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    let leak_inode = std::fs::read_link(format!("/proc/self/fd/{}", leak_r.as_raw_fd()))
        .map_err(|e| e.to_string())?
        .to_string_lossy()
        .into_owned();
    let passed = tempfile::tempfile().map_err(|e| e.to_string())?;
    let mut b = none_builder(ctx, base.path());
    b.console();
    let n = b.add_fd(&passed, 1, None, "").map_err(err("add_fd"))?;
    let mut m = b.build();
    m.launch().map_err(err("launch"))?;
    let pid = m.pid().ok_or("pid")?;
    let fds = fd_targets(pid)?;
    check(
        !fds.iter().any(|(_, t)| *t == leak_inode),
        format!("our inheritable pipe {leak_inode} leaked into qemu: {fds:?}"),
    )?;
    check(
        fds.iter().any(|(fd, _)| *fd == n),
        format!("passed fd {n} missing: {fds:?}"),
    )?;
    let stdin = fds.iter().find(|(fd, _)| *fd == 0).map(|(_, t)| t.as_str());
    check(stdin == Some("/dev/null"), format!("stdin {stdin:?}"))?;
    m.shutdown().map_err(err("shutdown"))?;
    drop((leak_r, leak_w));
    Ok(())
}

fn external_signal(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = none_builder(ctx, base.path()).build();
    m.launch().map_err(err("launch"))?;
    let pid = m.pid().ok_or("pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| e.to_string())?;
    // A command in flight or after the death fails fast with a typed error.
    let started = Instant::now();
    let result = m.cmd("query-status", ());
    check(result.is_err(), "command after SIGKILL failed")?;
    check(started.elapsed() < Duration::from_secs(2), "failed fast")?;
    let report = m.wait(Duration::from_secs(5)).map_err(err("wait"))?;
    check(
        report.ended_by
            == EndedBy::ExternalSignal {
                signal: libc::SIGKILL,
            },
        format!("ended by {}", report.ended_by),
    )?;
    Ok(())
}

fn escalating_ladder(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = none_builder(ctx, base.path()).build();
    m.launch().map_err(err("launch"))?;
    // `-M none` ignores the power button: that rung times out, quit works.
    let ladder = ShutdownLadder::escalating(
        Duration::from_millis(300),
        Duration::from_secs(5),
        Duration::from_secs(5),
    );
    let report = m.shutdown_with(&ladder).map_err(err("shutdown"))?;
    check(
        report.ended_by == EndedBy::Quit,
        format!("ended by {}", report.ended_by),
    )?;
    check(
        report.steps.len() == 2 && report.steps[0].outcome == StepOutcome::TimedOut,
        format!("steps {:?}", report.steps),
    )?;
    check(
        report.steps[0].elapsed >= Duration::from_millis(300),
        "the powerdown rung took its time",
    )?;
    check(
        report.last_events.iter().any(|e| e.event == "POWERDOWN"),
        "POWERDOWN event recorded",
    )?;
    // A ladder whose graceful rungs all fail ends in an abnormal shutdown, cleaned up.
    m.launch().map_err(err("relaunch"))?;
    m.cmd("stop", ()).map_err(err("stop"))?;
    let ladder = ShutdownLadder::new([Step::Powerdown {
        timeout: Duration::from_millis(200),
    }]);
    match m.shutdown_with(&ladder) {
        Err(Error::AbnormalShutdown { report, cause }) => {
            check(report.ended_by == EndedBy::Kill, "killed")?;
            check(
                matches!(*cause, Error::ExitTimeout { .. }),
                format!("cause {cause:?}"),
            )?;
        }
        other => return Err(format!("expected AbnormalShutdown: {other:?}")),
    }
    check(
        entries(base.path()) == 0,
        "cleaned up after abnormal shutdown",
    )?;
    Ok(())
}

fn guest_console(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = guest_machine(ctx, base.path(), &[])?;
    m.launch().map_err(err("launch"))?;
    wait_banner(&mut m, ctx)?;
    let console = m.console().map_err(err("console"))?;
    console
        .exec_and_wait(
            "hello",
            &Pattern::substring("ERR unknown command: hello"),
            Duration::from_secs(10),
        )
        .map_err(|e| format!("echo: {}", chain(&e)))?;
    console
        .exec_and_wait(
            "flood 100000",
            &Pattern::substring(guest::FLOOD_DONE),
            Duration::from_secs(20),
        )
        .map_err(|e| format!("flood: {}", chain(&e)))?;
    console
        .wait_for(&Pattern::substring(guest::PROMPT), Duration::from_secs(5))
        .map_err(|e| format!("prompt: {}", chain(&e)))?;
    console
        .send_line("exit 5")
        .map_err(|e| format!("exit: {}", chain(&e)))?;
    let report = m.wait(Duration::from_secs(10)).map_err(err("wait"))?;
    let code = guest::exit_status_for(5);
    check(
        report.status == ExitStatus::Code(code),
        format!("status {}", report.status),
    )?;
    check(
        report.ended_by == EndedBy::DebugExit { value: 5 },
        format!("ended by {}", report.ended_by),
    )?;
    check(
        report.console_tail.iter().any(|l| l.contains("exit 5")),
        format!("console tail {:?}", report.console_tail),
    )?;
    // The console stays readable after the exit.
    let tail = m.console().map_err(err("console after exit"))?.tail(4096);
    check(
        String::from_utf8_lossy(&tail).contains("exit 5"),
        "console after exit",
    )?;
    Ok(())
}

fn guest_poweroff_wait(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = guest_machine(ctx, base.path(), &[])?;
    m.launch().map_err(err("launch"))?;
    wait_banner(&mut m, ctx)?;
    m.console()
        .map_err(err("console"))?
        .send_line(guest::CMD_POWEROFF)
        .map_err(|e| format!("poweroff: {}", chain(&e)))?;
    let report = m.wait(Duration::from_secs(10)).map_err(err("wait"))?;
    check(
        report.ended_by
            == EndedBy::Guest {
                reason: "guest-shutdown".into(),
            },
        format!("ended by {}", report.ended_by),
    )?;
    check(report.status == ExitStatus::Code(0), "exit 0")?;
    check(
        matches!(report.steps.as_slice(), [r] if matches!(r.step, Step::Wait { .. })),
        format!("steps {:?}", report.steps),
    )?;
    Ok(())
}

fn guest_powerdown_ladder(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = guest_machine(ctx, base.path(), &[])?;
    m.launch().map_err(err("launch"))?;
    wait_banner(&mut m, ctx)?;
    let ladder = ShutdownLadder::escalating(
        Duration::from_secs(10),
        Duration::from_secs(5),
        Duration::from_secs(5),
    );
    let report = m.shutdown_with(&ladder).map_err(err("shutdown"))?;
    check(
        report.ended_by
            == EndedBy::Powerdown {
                reason: Some("guest-shutdown".into()),
            },
        format!("ended by {}", report.ended_by),
    )?;
    check(
        report
            .console_tail
            .iter()
            .any(|l| l.contains(guest::POWER_BUTTON_LINE)),
        format!("console tail {:?}", report.console_tail),
    )?;
    Ok(())
}

fn no_shutdown_event(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = guest_machine(ctx, base.path(), &["-no-shutdown"])?;
    m.launch().map_err(err("launch"))?;
    wait_banner(&mut m, ctx)?;
    m.console()
        .map_err(err("console"))?
        .send_line(guest::CMD_POWEROFF)
        .map_err(|e| format!("poweroff: {}", chain(&e)))?;
    let ev = m
        .event_wait("SHUTDOWN", None, Duration::from_secs(10))
        .map_err(err("SHUTDOWN"))?;
    check(ev.event == "SHUTDOWN", "SHUTDOWN seen")?;
    // QEMU stays (-no-shutdown); a SHUTDOWN event alone must not make us kill it.
    let status = m.cmd("query-status", ()).map_err(err("query-status"))?;
    check(status["status"] == "shutdown", format!("status {status}"))?;
    check(m.is_running(), "still running after SHUTDOWN")?;
    let report = m.shutdown().map_err(err("shutdown"))?;
    check(
        report.ended_by == EndedBy::Quit,
        format!("ended by {}", report.ended_by),
    )?;
    check(report.status == ExitStatus::Code(0), "exit 0")?;
    Ok(())
}

fn console_flood_unread(ctx: &Ctx) -> Result<(), String> {
    let base = base_dir()?;
    let mut m = guest_machine(ctx, base.path(), &[])?;
    m.launch().map_err(err("launch"))?;
    wait_banner(&mut m, ctx)?;
    // 200 kB the caller never reads: the drain keeps QEMU from blocking on the socket.
    let console = m.console().map_err(err("console"))?;
    console
        .send_line("flood 200000")
        .map_err(|e| format!("flood: {}", chain(&e)))?;
    // QMP stays responsive meanwhile.
    m.cmd("query-status", ())
        .map_err(err("query-status during the flood"))?;
    let console = m.console().map_err(err("console"))?;
    console
        .wait_for(
            &Pattern::substring(guest::FLOOD_DONE),
            Duration::from_secs(30),
        )
        .map_err(|e| format!("flood done: {}", chain(&e)))?;
    let started = Instant::now();
    let report = m.shutdown().map_err(err("shutdown"))?;
    check(
        started.elapsed() < Duration::from_secs(5),
        "shutdown under 5 s",
    )?;
    check(
        report.ended_by == EndedBy::Quit,
        format!("ended by {}", report.ended_by),
    )?;
    let total = m.console().map_err(err("console"))?.bytes_total();
    check(total >= 200_000, format!("console bytes {total}"))?;
    Ok(())
}

/// A fleet of 8 tiny guests from one thread: each shows its banner; one is SIGKILLed from
/// outside and another SIGSTOPped (its monitor hangs) mid-run; the other six answer
/// `query-status` and shut down gracefully; each member's slot says what happened to it.
fn fleet_kill_and_stop(ctx: &Ctx) -> Result<(), String> {
    const N: usize = 8;
    let (killed, stopped) = (2, 5);
    let base = base_dir()?;
    let mut fleet = Fleet::new().map_err(err("fleet"))?;
    for _ in 0..N {
        fleet.add(guest_machine(ctx, base.path(), &[])?);
    }
    let started = Instant::now();
    for (id, result) in fleet.launch_all() {
        result.map_err(|e| format!("launch {id}: {}", chain(&e)))?;
    }
    let launched = started.elapsed();
    let ids: Vec<MemberId> = fleet.ids().collect();
    for &id in &ids {
        wait_banner(fleet.machine(id), ctx).map_err(|e| format!("{id}: {e}"))?;
    }
    ctx.note(format!(
        "{N} launched in {launched:?}, all banners after {:?}",
        started.elapsed()
    ));
    let pid = |fleet: &mut Fleet, i: usize| -> Result<nix::unistd::Pid, String> {
        let pid = fleet
            .machine(ids[i])
            .pid()
            .ok_or(format!("{} has no pid", ids[i]))?;
        Ok(nix::unistd::Pid::from_raw(pid as i32))
    };
    use nix::sys::signal::{kill, Signal};
    kill(pid(&mut fleet, killed)?, Signal::SIGKILL).map_err(|e| format!("SIGKILL: {e}"))?;
    kill(pid(&mut fleet, stopped)?, Signal::SIGSTOP).map_err(|e| format!("SIGSTOP: {e}"))?;

    let timeout = Duration::from_secs(2);
    let asked = Instant::now();
    let replies = fleet.qmp_all(&ids, "query-status", (), timeout);
    let took = asked.elapsed();
    check(
        took < timeout + Duration::from_secs(2),
        format!("query-status took {took:?}"),
    )?;
    for (id, reply) in &replies {
        match (id.index(), reply) {
            (i, Err(Error::Qmp { source, .. })) if i == stopped => check(
                matches!(
                    source,
                    machine_core::qmp_client::Error::CommandTimeout { .. }
                ),
                format!("{id} (stopped): {source}"),
            )?,
            (i, Err(Error::Qmp { .. } | Error::NotRunning)) if i == killed => {}
            (i, Ok(reply)) if i != killed && i != stopped => check(
                reply["return"]["status"] == "running",
                format!("{id}: {reply}"),
            )?,
            (_, other) => return Err(format!("{id}: unexpected {other:?}")),
        }
    }
    let asked = Instant::now();
    let reports = fleet.shutdown_all(timeout);
    let took = asked.elapsed();
    // The stopped member holds the shutdown to its deadline; then SIGKILL ends it.
    check(
        took < timeout + Duration::from_secs(3),
        format!("shutdown took {took:?}"),
    )?;
    let mut summary = Vec::new();
    for (id, report) in &reports {
        let i = id.index();
        let what = match report {
            Ok(r) if i == killed => {
                check(
                    r.ended_by
                        == EndedBy::ExternalSignal {
                            signal: libc::SIGKILL,
                        },
                    format!("{id} (killed): {}", r.summary()),
                )?;
                r.ended_by.to_string()
            }
            Err(Error::AbnormalShutdown { report, .. }) if i == stopped => {
                check(
                    report.ended_by == EndedBy::Kill,
                    format!("{id} (stopped): {}", report.summary()),
                )?;
                format!("{} after the graceful deadline", report.ended_by)
            }
            Ok(r) if i != killed && i != stopped => {
                check(
                    r.ended_by == EndedBy::Quit && r.clean(),
                    format!("{id}: {}", r.summary()),
                )?;
                // The guest ran from its launch to its quit: no member waited on another.
                r.ended_by.to_string()
            }
            other => return Err(format!("{id}: unexpected {other:?}")),
        };
        summary.push(format!("{id}: {what}"));
    }
    check(reports.len() == N, format!("{} reports", reports.len()))?;
    ctx.note(format!(
        "shutdown of all in {took:?}; {}",
        summary.join("; ")
    ));
    drop(fleet);
    check(
        entries(base.path()) == 0,
        "temp dirs left behind".to_string(),
    )
}
