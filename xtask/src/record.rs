//! `cargo xtask record [--qemu system|10.0|11.1|all|PATH] [--out DIR]`: records real QMP sessions
//! of each QEMU into transcripts (`qmp_client::replay`'s format) for the offline replay tests.
//!
//! Four sessions per version, each QEMU started with the suite's `-compat` policy when it has
//! one:
//!
//! - `session` (`-M none`): a command before negotiation, `qmp_capabilities`, `query-version`,
//!   `query-status`, `query-commands`, `query-qmp-schema`, the cheap event sources (stop, cont,
//!   system_reset, system_powerdown), error replies of each kind, block jobs (backup to
//!   completion, mirror to READY then `job-complete`), HMP passthrough, QOM, and `quit`;
//! - `oob` (`-M none`, `oob` negotiated): `exec-oob` of an in-band-only command, of an
//!   out-of-band one that fails (with and without an id), an in-band command, and `quit`;
//! - `deprecated` (`-M none`): `query-kvm` and `block-job-dismiss`, which 11.1 deprecates (so
//!   the `-compat` policy refuses them there), beside `job-dismiss`;
//! - `guest-exit` (q35 with the tiny guest, qboot, `isa-debug-exit` and an xHCI controller, under
//!   `-S`): USB hot-plug (`device_add`/`device_del` -> DEVICE_DELETED; a running q35 gives no
//!   DEVICE_DELETED here), `cont`, `query-status` once the guest is up,
//!   then the guest's `exit 5`: what QEMU says on QMP before the exit status 11.
//!
//! Each message is written with its direction and the time since the connection; QEMU's bytes
//! are kept exactly (CRLF and all). Commands are sent one at a time, in one write, without a
//! trailing newline (as our client does), each waiting for its reply and the events it causes.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use console_socket::{Config as ConsoleConfig, Console, LineEnding, Pattern};
use machine_core::guest::{self, GuestMachine};
use serde_json::{json, Value};

use crate::e2e::{socketpair, Ctx, QemuChild};
use crate::versions::Choice;

/// Records the sessions of each requested QEMU into the output directory.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut choices = Choice::parse_list("all");
    let mut out = qmp_client::replay::transcripts_dir();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--qemu" => {
                choices = Choice::parse_list(
                    it.next()
                        .ok_or("--qemu takes system, 10.0, 11.1, all or a path")?,
                )
            }
            "--out" => out = PathBuf::from(it.next().ok_or("--out takes a directory")?),
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    for choice in &choices {
        let qemu = choice.ensure()?;
        let line = crate::qemu::version(&qemu)?;
        let version = crate::qemu::version_number(&line).to_string();
        let compat = crate::qemu::has_compat(&qemu)?;
        let scratch = tempfile::Builder::new()
            .prefix("qm-record-")
            .tempdir()
            .map_err(|e| format!("cannot create a scratch directory: {e}"))?;
        let ctx = Ctx::standalone(
            qemu.clone(),
            version.clone(),
            scratch.path().to_path_buf(),
            Duration::from_secs(60),
        );
        for (name, record) in [
            (
                "session",
                session as fn(&Ctx, bool) -> Result<Vec<Value>, String>,
            ),
            ("oob", oob),
            ("deprecated", deprecated),
            ("guest-exit", guest_exit),
        ] {
            let lines = record(&ctx, compat).map_err(|e| format!("QEMU {version} {name}: {e}"))?;
            let path = out.join(format!("qemu-{version}-{name}.jsonl"));
            write_transcript(&path, &lines)?;
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            eprintln!(
                "record: {} ({} messages, {} KB)",
                path.display(),
                lines.len().saturating_sub(1),
                size / 1024
            );
        }
    }
    Ok(())
}

/// Writes one JSON value per line.
fn write_transcript(path: &Path, lines: &[Value]) -> Result<(), String> {
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The transcript's header.
fn header(name: &str, ctx: &Ctx, argv: &[String]) -> Value {
    json!({
        "transcript": name,
        "qemu": ctx.qemu_version,
        "recorded_with": "cargo xtask record",
        "argv": argv,
    })
}

/// QEMU on `-M none` with its monitor on a socketpair, and a recorder on our end.
fn start_none(ctx: &Ctx, compat: bool, name: &str) -> Result<(QemuChild, Recorder), String> {
    let mut argv: Vec<String> = ["-M", "none", "-nodefaults", "-display", "none"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.extend(ctx.accel_args().iter().map(|s| s.to_string()));
    if compat {
        argv.extend(["-compat".to_string(), crate::qemu::COMPAT.to_string()]);
    }
    let (ours, theirs) = socketpair()?;
    let mut cmd = ctx.qemu_command();
    let fd = cmd.pass_fd(theirs);
    cmd.args(&argv)
        .arg("-chardev")
        .arg(format!("socket,id=qmp,fd={fd}"))
        .args(["-mon", "chardev=qmp,mode=control"]);
    argv.extend([
        "-chardev".to_string(),
        "socket,id=qmp,fd=N".to_string(),
        "-mon".to_string(),
        "chardev=qmp,mode=control".to_string(),
    ]);
    let qemu = cmd.spawn()?;
    let rec = Recorder::new(ours, ctx.deadline, header(name, ctx, &argv));
    Ok((qemu, rec))
}

/// The `-M none` session (see the module docs).
fn session(ctx: &Ctx, compat: bool) -> Result<Vec<Value>, String> {
    let (mut qemu, mut rec) = start_none(ctx, compat, "session")?;
    rec.greeting()?;
    // Refused: capabilities are not negotiated yet.
    rec.command("query-status", None)?;
    rec.command("qmp_capabilities", None)?;
    for name in [
        "query-version",
        "query-status",
        "query-commands",
        "query-qmp-schema",
    ] {
        rec.command(name, None)?;
    }
    rec.command("stop", None)?;
    rec.wait_event("STOP")?;
    rec.command("query-status", None)?;
    // Already stopped: no second STOP.
    rec.command("stop", None)?;
    rec.command("cont", None)?;
    rec.wait_event("RESUME")?;
    rec.command("system_reset", None)?;
    rec.wait_event("RESET")?;
    rec.command("system_powerdown", None)?;
    rec.wait_event("POWERDOWN")?;
    // Errors of each kind.
    rec.command("no-such-command", None)?;
    rec.command("device_del", Some(json!({"id": "nope"})))?;
    rec.command("query-status", Some(json!({"bogus": 1})))?;
    rec.command("blockdev-add", Some(json!({"node-name": "x"})))?;
    rec.command("qom-get", Some(json!({"path": 1, "property": "type"})))?;
    rec.command("getfd", Some(json!({"fdname": "nofd"})))?;
    rec.command("job-complete", Some(json!({"id": "nojob"})))?;
    let id = rec.next_id();
    rec.command_raw(&json!({"exec-oob": "query-status", "id": id}))?;
    // Block jobs on null-co nodes: no files.
    for node in ["src", "dst"] {
        rec.command(
            "blockdev-add",
            Some(json!({"driver": "null-co", "node-name": node, "size": 16 << 20})),
        )?;
    }
    rec.command(
        "blockdev-backup",
        Some(json!({"job-id": "job0", "device": "src", "target": "dst", "sync": "full"})),
    )?;
    rec.wait_event("BLOCK_JOB_COMPLETED")?;
    rec.wait_job_status("job0", "null")?;
    rec.command(
        "blockdev-mirror",
        Some(json!({"job-id": "job1", "device": "src", "target": "dst", "sync": "full"})),
    )?;
    rec.wait_event("BLOCK_JOB_READY")?;
    rec.command("query-jobs", None)?;
    rec.command("job-complete", Some(json!({"id": "job1"})))?;
    rec.wait_event("BLOCK_JOB_COMPLETED")?;
    rec.wait_job_status("job1", "null")?;
    rec.command("blockdev-del", Some(json!({"node-name": "dst"})))?;
    rec.command("blockdev-del", Some(json!({"node-name": "src"})))?;
    rec.command(
        "human-monitor-command",
        Some(json!({"command-line": "info version"})),
    )?;
    rec.command("qom-list", Some(json!({"path": "/machine"})))?;
    rec.command(
        "qom-get",
        Some(json!({"path": "/machine", "property": "type"})),
    )?;
    rec.command("quit", None)?;
    rec.wait_event("SHUTDOWN")?;
    rec.read_to_end()?;
    let status = qemu.wait_until(ctx.deadline)?;
    rec.finish(status.code())
}

/// The `-M none` session with `oob` negotiated (see the module docs).
fn oob(ctx: &Ctx, compat: bool) -> Result<Vec<Value>, String> {
    let (mut qemu, mut rec) = start_none(ctx, compat, "oob")?;
    rec.greeting()?;
    rec.command("qmp_capabilities", Some(json!({"enable": ["oob"]})))?;
    // In-band only: refused out of band.
    let id = rec.next_id();
    rec.command_raw(&json!({"exec-oob": "query-status", "id": id}))?;
    // Allowed out of band, refused here (no migration to pause).
    let id = rec.next_id();
    rec.command_raw(&json!({"exec-oob": "migrate-pause", "id": id}))?;
    // Without an id: QEMU runs it and answers without one.
    rec.command_raw(&json!({"exec-oob": "migrate-pause"}))?;
    rec.command("query-status", None)?;
    rec.command("quit", None)?;
    rec.wait_event("SHUTDOWN")?;
    rec.read_to_end()?;
    let status = qemu.wait_until(ctx.deadline)?;
    rec.finish(status.code())
}

/// The `-M none` session of commands a later version deprecates (see the module docs): under
/// `deprecated-input=reject` they stop working on the version that deprecates them.
fn deprecated(ctx: &Ctx, compat: bool) -> Result<Vec<Value>, String> {
    let (mut qemu, mut rec) = start_none(ctx, compat, "deprecated")?;
    rec.greeting()?;
    rec.command("qmp_capabilities", None)?;
    // Deprecated in 11.1 (query-accelerators replaces it).
    rec.command("query-kvm", None)?;
    // Deprecated in 11.1 (the job-* commands replace the block-job-* ones).
    rec.command("block-job-dismiss", Some(json!({"id": "nojob"})))?;
    rec.command("job-dismiss", Some(json!({"id": "nojob"})))?;
    rec.command("quit", None)?;
    rec.wait_event("SHUTDOWN")?;
    rec.read_to_end()?;
    let status = qemu.wait_until(ctx.deadline)?;
    rec.finish(status.code())
}

/// The q35 guest session ending in the guest's `exit 5` (see the module docs).
fn guest_exit(ctx: &Ctx, compat: bool) -> Result<Vec<Value>, String> {
    let kernel = ctx.write_guest_kernel()?;
    let mut qemu_args: Vec<String> = guest::qemu_args(&kernel, GuestMachine::Q35)
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    qemu_args.extend(ctx.accel_args().iter().map(|s| s.to_string()));
    qemu_args.extend(
        [
            "-nodefaults",
            "-display",
            "none",
            "-device",
            "qemu-xhci,id=usb",
            "-S",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    if compat {
        qemu_args.extend(["-compat".to_string(), crate::qemu::COMPAT.to_string()]);
    }
    let (console_ours, console_theirs) = socketpair()?;
    let (qmp_ours, qmp_theirs) = socketpair()?;
    let mut cmd = ctx.qemu_command();
    let console_fd = cmd.pass_fd(console_theirs);
    let qmp_fd = cmd.pass_fd(qmp_theirs);
    cmd.args(&qemu_args)
        .arg("-chardev")
        .arg(format!("socket,id=con,fd={console_fd}"))
        .args(["-serial", "chardev:con"])
        .arg("-chardev")
        .arg(format!("socket,id=qmp,fd={qmp_fd}"))
        .args(["-mon", "chardev=qmp,mode=control"]);
    let mut argv: Vec<String> = qemu_args
        .into_iter()
        .map(|a| {
            if a == kernel.to_string_lossy() {
                guest::KERNEL_FILE_NAME.to_string()
            } else {
                a
            }
        })
        .collect();
    argv.extend(
        [
            "-chardev",
            "socket,id=con,fd=N",
            "-serial",
            "chardev:con",
            "-chardev",
            "socket,id=qmp,fd=M",
            "-mon",
            "chardev=qmp,mode=control",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut console = Console::from_unix_stream(
        console_ours,
        ConsoleConfig::default().with_line_ending(LineEnding::Lf),
    )
    .map_err(|e| format!("console: {e}"))?;
    let mut qemu = cmd.spawn()?;
    let mut rec = Recorder::new(qmp_ours, ctx.deadline, header("guest-exit", ctx, &argv));
    rec.greeting()?;
    rec.command("qmp_capabilities", None)?;
    rec.command(
        "device_add",
        Some(json!({"driver": "usb-kbd", "id": "kbd0", "bus": "usb.0"})),
    )?;
    rec.command("device_del", Some(json!({"id": "kbd0"})))?;
    rec.wait_event("DEVICE_DELETED")?;
    rec.command("cont", None)?;
    rec.wait_event("RESUME")?;
    console
        .wait_for(
            &Pattern::substring(format!("{}\r\n{}", guest::BANNER, guest::PROMPT)),
            ctx.remaining(),
        )
        .map_err(|e| format!("waiting for the guest's prompt: {e}"))?;
    rec.command("query-status", None)?;
    console
        .send(guest::Command::Exit(5).to_line().as_bytes())
        .map_err(|e| format!("sending exit 5 to the guest: {e}"))?;
    rec.read_to_end()?;
    let status = qemu.wait_until(ctx.deadline)?;
    if status.code() != Some(guest::exit_status_for(5)) {
        return Err(format!(
            "the guest's exit 5 ended QEMU with {status}, not exit {}",
            guest::exit_status_for(5)
        ));
    }
    rec.finish(status.code())
}

/// A raw QMP peer that writes down everything it sends and receives.
struct Recorder {
    stream: UnixStream,
    started: Instant,
    deadline: Instant,
    lines: Vec<Value>,
    buffer: Vec<u8>,
    /// Messages read but not looked at yet.
    unread: VecDeque<Value>,
    ids: u32,
    end: Option<&'static str>,
    ended_at: Duration,
}

impl Recorder {
    fn new(stream: UnixStream, deadline: Instant, header: Value) -> Recorder {
        Recorder {
            stream,
            started: Instant::now(),
            deadline,
            lines: vec![header],
            buffer: Vec::new(),
            unread: VecDeque::new(),
            ids: 0,
            end: None,
            ended_at: Duration::ZERO,
        }
    }

    fn ms(&self) -> f64 {
        (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3
    }

    /// A fresh id, `rec-N`.
    fn next_id(&mut self) -> Value {
        self.ids += 1;
        json!(format!("rec-{}", self.ids))
    }

    /// Reads the greeting.
    fn greeting(&mut self) -> Result<(), String> {
        let message = self.next_message()?;
        if message.get("QMP").is_none() {
            return Err(format!("expected the greeting, got {message}"));
        }
        Ok(())
    }

    /// Sends a command with a fresh id and waits for its reply (success or error).
    fn command(&mut self, name: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut command = json!({"execute": name});
        if let Some(arguments) = arguments {
            command["arguments"] = arguments;
        }
        command["id"] = self.next_id();
        self.command_raw(&command)
    }

    /// Sends `command` as it is and waits for the reply carrying its id.
    fn command_raw(&mut self, command: &Value) -> Result<Value, String> {
        let text = command.to_string();
        self.lines
            .push(json!({"ms": self.ms(), "from": "client", "text": text}));
        self.stream
            .write_all(text.as_bytes())
            .map_err(|e| format!("cannot send {text}: {e}"))?;
        let id = command.get("id").cloned();
        let mut skipped = VecDeque::new();
        let reply = loop {
            let message = self.next_message()?;
            let is_reply = message.get("return").is_some() || message.get("error").is_some();
            if is_reply && (message.get("id") == id.as_ref() || message.get("id").is_none()) {
                break message;
            }
            skipped.push_back(message);
        };
        // Events seen on the way stay available to wait_event.
        skipped.extend(self.unread.drain(..));
        self.unread = skipped;
        Ok(reply)
    }

    /// Waits for an event named `name` (skipping others).
    fn wait_event(&mut self, name: &str) -> Result<Value, String> {
        loop {
            let message = self.next_message()?;
            if message["event"] == name {
                return Ok(message);
            }
        }
    }

    /// Waits for `JOB_STATUS_CHANGE` of `job` to `status`.
    fn wait_job_status(&mut self, job: &str, status: &str) -> Result<(), String> {
        loop {
            let message = self.next_message()?;
            if message["event"] == "JOB_STATUS_CHANGE"
                && message["data"]["id"] == job
                && message["data"]["status"] == status
            {
                return Ok(());
            }
        }
    }

    /// The next message, from those read already or from the socket.
    fn next_message(&mut self) -> Result<Value, String> {
        loop {
            if let Some(message) = self.unread.pop_front() {
                return Ok(message);
            }
            if self.end.is_some() {
                return Err("QEMU closed the monitor".to_string());
            }
            self.read_some()?;
        }
    }

    /// Reads once (up to the deadline); records each complete line with the time of the read.
    fn read_some(&mut self) -> Result<(), String> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "timed out waiting for QEMU; last: {}",
                self.last_lines()
            ));
        }
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("set_read_timeout: {e}"))?;
        let mut chunk = [0u8; 65536];
        let n = match self.stream.read(&mut chunk) {
            Ok(0) => {
                self.ended("eof");
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                self.ended("reset");
                return Ok(());
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!(
                    "timed out waiting for QEMU; last: {}",
                    self.last_lines()
                ));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(format!("read: {e}")),
        };
        let ms = self.ms();
        self.buffer.extend_from_slice(&chunk[..n]);
        while let Some(newline) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=newline).collect();
            let text = String::from_utf8(line).map_err(|e| format!("QEMU sent non-UTF-8: {e}"))?;
            let message: Value = serde_json::from_str(text.trim_end())
                .map_err(|e| format!("QEMU sent a line that is not JSON ({e}): {text:?}"))?;
            self.lines
                .push(json!({"ms": ms, "from": "qemu", "text": text}));
            self.unread.push_back(message);
        }
        Ok(())
    }

    /// The last few lines recorded, for error messages.
    fn last_lines(&self) -> String {
        let from = self.lines.len().saturating_sub(3);
        self.lines[from..]
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn ended(&mut self, how: &'static str) {
        self.end = Some(how);
        self.ended_at = self.started.elapsed();
    }

    /// Reads (recording) until QEMU closes the monitor.
    fn read_to_end(&mut self) -> Result<(), String> {
        while self.end.is_none() {
            self.read_some()?;
        }
        if !self.buffer.is_empty() {
            return Err(format!(
                "QEMU closed the monitor inside a message: {:?}",
                String::from_utf8_lossy(&self.buffer)
            ));
        }
        Ok(())
    }

    /// The transcript's lines, with how it ended and QEMU's exit code.
    fn finish(mut self, exit: Option<i32>) -> Result<Vec<Value>, String> {
        let how = self.end.ok_or("the session has not ended")?;
        let ms = (self.ended_at.as_secs_f64() * 1e6).round() / 1e3;
        self.lines.push(json!({"ms": ms, "end": how, "exit": exit}));
        Ok(self.lines)
    }
}
