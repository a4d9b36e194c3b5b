//! End-to-end scenarios for `qmp_client` against a real `qemu-system-x86_64 -M none`.
//!
//! Each scenario spawns QEMU itself (a socketpair end handed over as `-chardev socket,fd=N`,
//! or a unix path) inside a guard that kills and reaps it on drop, so a failing scenario never
//! leaves a QEMU behind.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use qmp_client::{Config, Connection, Error, Listener, Shared};
use qmp_proto::{ErrorClass, EventFilter, ServerMessage};
use serde_json::{json, Map, Value};

use super::{Accel, Ctx, Scenario};

/// The scenarios of this area.
pub fn scenarios() -> Vec<Scenario> {
    let s = |name, run| Scenario {
        name,
        accels: &[Accel::Tcg, Accel::Kvm],
        timeout: Duration::from_secs(30),
        run,
    };
    vec![
        s("client-handshake", handshake),
        s("client-commands", commands),
        s("client-stop-cont-events", stop_cont_events),
        s("client-quit-clean-close", quit_clean_close),
        s("client-fd-passing", fd_passing),
        s("client-oob", oob),
        s("client-pretty", pretty),
        s("client-listener", listener),
        s("client-connect-unix", connect_unix),
        s("client-threads", threads),
        s("client-pipelined-events", pipelined_events),
        s("client-qemu-dies-before-greeting", dies_before_greeting),
        s(
            "client-second-client-greeting-timeout",
            second_client_timeout,
        ),
        s("client-device-del-event", device_del_event),
    ]
}

/// A QEMU process, killed (if still running) and reaped when dropped.
struct Qemu {
    child: Child,
}

impl Qemu {
    /// Spawns `qemu -M none -nodefaults -display none -accel A <extra>`; `inherit` fds are
    /// passed to QEMU under their own numbers (and closed here once QEMU has them).
    fn spawn(ctx: &Ctx, extra: &[String], inherit: Vec<OwnedFd>) -> Result<Qemu, String> {
        Qemu::spawn_machine(ctx, "none", extra, inherit)
    }

    /// [`Qemu::spawn`] with another machine type.
    fn spawn_machine(
        ctx: &Ctx,
        machine: &str,
        extra: &[String],
        inherit: Vec<OwnedFd>,
    ) -> Result<Qemu, String> {
        for fd in &inherit {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))
                .map_err(|e| format!("cannot make fd inheritable: {e}"))?;
        }
        let child = Command::new(&ctx.qemu)
            .args(["-M", machine, "-nodefaults", "-display", "none"])
            .args(["-accel", ctx.accel.as_str()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", ctx.qemu.display()))?;
        drop(inherit);
        Ok(Qemu { child })
    }

    /// QEMU with a QMP monitor on a socketpair; returns our end too.
    fn with_monitor(ctx: &Ctx, pretty: bool) -> Result<(Qemu, UnixStream), String> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
        let fd = theirs.as_raw_fd();
        let mon = if pretty {
            "chardev=mon,mode=control,pretty=on"
        } else {
            "chardev=mon,mode=control"
        };
        let args = [
            "-chardev".to_string(),
            format!("socket,id=mon,fd={fd}"),
            "-mon".to_string(),
            mon.to_string(),
        ];
        let qemu = Qemu::spawn(ctx, &args, vec![OwnedFd::from(theirs)])?;
        Ok((qemu, ours))
    }

    /// Waits for QEMU to exit until `deadline`.
    fn wait(&mut self, deadline: Instant) -> Result<ExitStatus, String> {
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err("QEMU did not exit in time".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config whose deadlines end no later than the scenario's.
fn config(ctx: &Ctx) -> Config {
    let left = ctx
        .deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let t = left.min(Duration::from_secs(10));
    Config::default()
        .with_greeting_timeout(t)
        .with_command_timeout(t)
        .with_connect_timeout(t)
}

fn connect(ctx: &Ctx) -> Result<(Qemu, Connection), String> {
    let (qemu, stream) = Qemu::with_monitor(ctx, false)?;
    let conn = Connection::from_unix_stream(stream, &config(ctx)).map_err(err)?;
    Ok((qemu, conn))
}

fn err(e: Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn args(value: Value) -> Option<Map<String, Value>> {
    match value {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

fn handshake(ctx: &Ctx) -> Result<(), String> {
    let (_qemu, mut conn) = connect(ctx)?;
    let greeting = conn.greeting().ok_or("no greeting kept")?;
    check(greeting.version.qemu.major >= 7, || {
        format!("version {:?}", greeting.version)
    })?;
    check(conn.oob_enabled(), || {
        "oob offered by QEMU but not enabled".into()
    })
}

fn commands(ctx: &Ctx) -> Result<(), String> {
    let (_qemu, mut conn) = connect(ctx)?;
    let status = conn.execute("query-status", None).map_err(err)?;
    check(
        status["status"] == "running" || status["status"] == "prelaunch",
        || format!("status {status}"),
    )?;
    let version = conn.execute("query-version", None).map_err(err)?;
    check(version["qemu"]["major"].as_u64() >= Some(7), || {
        format!("version {version}")
    })?;
    match conn.execute("no-such-command", None) {
        Err(Error::Command {
            command,
            class: ErrorClass::CommandNotFound,
            ..
        }) if command == "no-such-command" => {}
        other => return Err(format!("expected CommandNotFound, got {other:?}")),
    }
    match conn
        .execute_raw("device_del", args(json!({"id": "nothing"})))
        .map_err(err)?
    {
        ServerMessage::Error(e) => check(!e.error.desc.is_empty(), || "empty desc".into())?,
        other => return Err(format!("expected an error reply, got {other:?}")),
    }
    check(conn.unknown_replies() == 0 && conn.is_connected(), || {
        "connection state".into()
    })
}

fn stop_cont_events(ctx: &Ctx) -> Result<(), String> {
    let (_qemu, mut conn) = connect(ctx)?;
    let t = Duration::from_secs(5);
    let (_, stop) = conn
        .execute_and_wait("stop", None, &[EventFilter::new("STOP")], t)
        .map_err(err)?;
    check(stop.event == "STOP", || stop.event.clone())?;
    check(
        conn.execute("query-status", None).map_err(err)?["running"] == false,
        || "still running".into(),
    )?;
    conn.execute("cont", None).map_err(err)?;
    let resume = conn
        .wait_event(&[EventFilter::new("RESUME")], t)
        .map_err(err)?;
    check(resume.timestamp.seconds > 0, || "no timestamp".into())?;
    conn.execute("system_reset", None).map_err(err)?;
    let reset = conn
        .wait_event(
            &[EventFilter::new("RESET").with_pattern(json!({"data": {"guest": false}}))],
            t,
        )
        .map_err(err)?;
    check(reset.data.is_some(), || "RESET without data".into())?;
    let left: Vec<String> = conn.drain_events().into_iter().map(|e| e.event).collect();
    check(left.is_empty(), || format!("unexpected events {left:?}"))
}

fn quit_clean_close(ctx: &Ctx) -> Result<(), String> {
    let (mut qemu, mut conn) = connect(ctx)?;
    conn.execute("quit", None).map_err(err)?;
    let status = qemu.wait(ctx.deadline)?;
    check(status.success(), || format!("QEMU exit {status}"))?;
    let shutdown = conn
        .wait_event(&[EventFilter::new("SHUTDOWN")], Duration::from_secs(1))
        .map_err(err)?;
    check(
        shutdown
            .data
            .as_ref()
            .is_some_and(|d| d["reason"] == "host-qmp-quit"),
        || format!("{shutdown:?}"),
    )?;
    match conn.execute("query-status", None) {
        Err(e) if e.is_closed() => Ok(()),
        other => Err(format!("expected a clean close, got {other:?}")),
    }
}

fn fd_passing(ctx: &Ctx) -> Result<(), String> {
    let (_qemu, mut conn) = connect(ctx)?;
    let (r, _w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    conn.getfd("mypipe", r.as_fd()).map_err(err)?;
    conn.execute("closefd", args(json!({"fdname": "mypipe"})))
        .map_err(err)?;
    match conn.execute("closefd", args(json!({"fdname": "mypipe"}))) {
        Err(Error::Command { .. }) => {}
        other => return Err(format!("closefd twice should fail, got {other:?}")),
    }
    let added = conn.add_fd(r.as_fd(), None, Some("bench")).map_err(err)?;
    let set = added["fdset-id"]
        .as_u64()
        .ok_or_else(|| format!("add-fd returned {added}"))?;
    let sets = conn.execute("query-fdsets", None).map_err(err)?;
    let found = sets
        .as_array()
        .is_some_and(|a| a.iter().any(|s| s["fdset-id"].as_u64() == Some(set)));
    check(found, || format!("fdset {set} not in {sets}"))?;
    // Several fds in one message, then claimed one by one.
    let (r2, _w2) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    conn.send_fds(&[r.as_fd()]).map_err(err)?;
    conn.execute("getfd", args(json!({"fdname": "a"})))
        .map_err(err)?;
    conn.send_fds(&[r2.as_fd()]).map_err(err)?;
    conn.execute("getfd", args(json!({"fdname": "b"})))
        .map_err(err)?;
    conn.execute("closefd", args(json!({"fdname": "a"})))
        .map_err(err)?;
    conn.execute("closefd", args(json!({"fdname": "b"})))
        .map_err(err)?;
    Ok(())
}

fn oob(ctx: &Ctx) -> Result<(), String> {
    let (_qemu, mut conn) = connect(ctx)?;
    let yank = conn.execute_oob("query-yank", None).map_err(err)?;
    check(yank.is_array(), || format!("query-yank returned {yank}"))?;
    // An in-band-only command sent out of band is refused by QEMU, as data.
    match conn.execute_oob("query-status", None) {
        Err(Error::Command { .. }) => {}
        other => {
            return Err(format!(
                "expected an error for oob query-status, got {other:?}"
            ))
        }
    }
    check(conn.is_connected(), || "connection lost".into())
}

fn pretty(ctx: &Ctx) -> Result<(), String> {
    let (_qemu, stream) = Qemu::with_monitor(ctx, true)?;
    let mut conn = Connection::from_unix_stream(stream, &config(ctx)).map_err(err)?;
    let status = conn.execute("query-status", None).map_err(err)?;
    check(status.get("running").is_some(), || format!("{status}"))?;
    conn.execute_and_wait(
        "stop",
        None,
        &[EventFilter::new("STOP")],
        Duration::from_secs(5),
    )
    .map_err(err)?;
    Ok(())
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir, String> {
        let path = std::env::temp_dir().join(format!("qc-{tag}-{}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn listener(ctx: &Ctx) -> Result<(), String> {
    let dir = TempDir::new("listen")?;
    let path = dir.path().join("qmp.sock");
    let listener = Listener::bind_unix(&path).map_err(err)?;
    let _qemu = Qemu::spawn(
        ctx,
        &[
            "-chardev".into(),
            format!("socket,id=mon,path={}", path.display()),
            "-mon".into(),
            "chardev=mon,mode=control".into(),
        ],
        Vec::new(),
    )?;
    let mut conn = listener
        .accept(Duration::from_secs(10), None, &config(ctx))
        .map_err(err)?;
    check(!path.exists(), || "socket file left behind".into())?;
    conn.execute("query-status", None).map_err(err)?;
    Ok(())
}

fn connect_unix(ctx: &Ctx) -> Result<(), String> {
    let dir = TempDir::new("conn")?;
    let path = dir.path().join("qmp.sock");
    let _qemu = Qemu::spawn(
        ctx,
        &[
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path.display()),
        ],
        Vec::new(),
    )?;
    while !path.exists() {
        if Instant::now() >= ctx.deadline {
            return Err("QEMU never created its socket".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut conn = Connection::connect_unix(&path, &config(ctx)).map_err(err)?;
    conn.execute("query-status", None).map_err(err)?;
    Ok(())
}

fn threads(ctx: &Ctx) -> Result<(), String> {
    let (_qemu, conn) = connect(ctx)?;
    let mut shared = Shared::new(conn).map_err(err)?;
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let mut shared = shared.clone();
            std::thread::spawn(move || -> Result<(), String> {
                for _ in 0..50 {
                    let status = shared.execute("query-status", None).map_err(err)?;
                    check(status.get("status").is_some(), || format!("{status}"))?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "worker panicked".to_string())??;
    }
    check(shared.unknown_replies() == 0, || "unknown replies".into())
}

fn pipelined_events(ctx: &Ctx) -> Result<(), String> {
    let (_qemu, mut conn) = connect(ctx)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ids = Vec::new();
    for _ in 0..500 {
        ids.push(conn.send(qmp_proto::Command::new("stop")).map_err(err)?);
        ids.push(conn.send(qmp_proto::Command::new("cont")).map_err(err)?);
    }
    for id in ids {
        match conn.wait_reply(id, deadline).map_err(err)? {
            ServerMessage::Return(_) => {}
            other => return Err(format!("unexpected reply {other:?}")),
        }
    }
    let events = conn.drain_events();
    let stops = events.iter().filter(|e| e.event == "STOP").count();
    let resumes = events.iter().filter(|e| e.event == "RESUME").count();
    check(stops == 500 && resumes == 500, || {
        format!("{stops} STOP, {resumes} RESUME")
    })
}

/// Catalogue #2/#3: QEMU exits during the handshake (bad arguments, or SIGKILL): it ends at
/// once with EOF, not at the greeting timeout.
fn dies_before_greeting(ctx: &Ctx) -> Result<(), String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
    let fd = theirs.as_raw_fd();
    let args = [
        "-chardev".to_string(),
        format!("socket,id=mon,fd={fd}"),
        "-mon".to_string(),
        "chardev=mon,mode=control".to_string(),
        "-device".to_string(),
        "no-such-device".to_string(),
    ];
    let _qemu = Qemu::spawn(ctx, &args, vec![OwnedFd::from(theirs)])?;
    let start = Instant::now();
    // QEMU sends its greeting before it builds the machine, so the EOF lands in the
    // greeting or, usually, in the negotiation.
    match Connection::from_unix_stream(ours, &config(ctx)) {
        Err(Error::Eof { .. }) => {}
        Err(Error::Negotiation { cause }) if matches!(*cause, Error::Eof { .. }) => {}
        other => return Err(format!("expected Eof, got {other:?}")),
    }
    check(start.elapsed() < Duration::from_secs(3), || {
        format!("took {:?}", start.elapsed())
    })?;

    let (mut qemu, stream) = Qemu::with_monitor(ctx, false)?;
    qemu.child.kill().map_err(|e| e.to_string())?;
    match Connection::from_unix_stream(stream, &config(ctx)) {
        // The greeting may have been written before the kill landed.
        Err(Error::Eof { .. }) => Ok(()),
        Err(Error::Negotiation { cause }) if matches!(*cause, Error::Eof { .. }) => Ok(()),
        other => Err(format!("expected Eof after SIGKILL, got {other:?}")),
    }
}

/// Catalogue #4: a second client sits in QEMU's backlog while the first holds the monitor,
/// so no greeting comes: GreetingTimeout on time; after the first leaves, it works.
fn second_client_timeout(ctx: &Ctx) -> Result<(), String> {
    let dir = TempDir::new("second")?;
    let path = dir.path().join("qmp.sock");
    let _qemu = Qemu::spawn(
        ctx,
        &[
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path.display()),
        ],
        Vec::new(),
    )?;
    // QEMU binds the path before it listens on it: until then a connect is refused (or finds
    // no file), which the library reports at once, as it should; keep trying meanwhile.
    let first = loop {
        match Connection::connect_unix(&path, &config(ctx)) {
            Ok(conn) => break conn,
            Err(Error::Connect { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && Instant::now() < ctx.deadline =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(format!("connecting to QEMU's socket: {e}")),
        }
    };
    let timeout = Duration::from_millis(500);
    let start = Instant::now();
    match Connection::connect_unix(&path, &config(ctx).with_greeting_timeout(timeout)) {
        Err(Error::GreetingTimeout { .. }) => {}
        other => return Err(format!("expected GreetingTimeout, got {other:?}")),
    }
    let took = start.elapsed();
    check(
        took >= timeout && took < timeout + Duration::from_millis(100),
        || format!("greeting timeout fired after {took:?}"),
    )?;
    first.close().map_err(err)?;
    let mut again = Connection::connect_unix(&path, &config(ctx)).map_err(err)?;
    again.execute("query-status", None).map_err(err)?;
    Ok(())
}

/// execute_and_wait without the subscribe-after race: USB unplug needs no guest.
fn device_del_event(ctx: &Ctx) -> Result<(), String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
    let fd = theirs.as_raw_fd();
    let qemu_args = [
        "-chardev".to_string(),
        format!("socket,id=mon,fd={fd}"),
        "-mon".to_string(),
        "chardev=mon,mode=control".to_string(),
        "-device".to_string(),
        "qemu-xhci,id=usb".to_string(),
        "-S".to_string(),
    ];
    let _qemu = Qemu::spawn_machine(ctx, "q35", &qemu_args, vec![OwnedFd::from(theirs)])?;
    let mut conn = Connection::from_unix_stream(ours, &config(ctx)).map_err(err)?;
    conn.execute(
        "device_add",
        args(json!({"driver": "usb-kbd", "id": "kbd0", "bus": "usb.0"})),
    )
    .map_err(err)?;
    let (_, event) = conn
        .execute_and_wait(
            "device_del",
            args(json!({"id": "kbd0"})),
            &[
                EventFilter::new("DEVICE_DELETED")
                    .with_pattern(json!({"data": {"device": "kbd0"}})),
            ],
            Duration::from_secs(5),
        )
        .map_err(err)?;
    check(event.data.is_some_and(|d| d["device"] == "kbd0"), || {
        "wrong device".into()
    })
}
