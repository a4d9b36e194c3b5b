//! Machine against the recorded QMP sessions of every QEMU version (`qmp_client::replay`):
//! launch, commands, events, our quit and the guest's isa-debug-exit exit, with QEMU's real
//! bytes. The "QEMU" is a stub that only waits and exits with the recorded status; its monitor
//! (`Monitor::Unix`: we listen, QEMU connects) is served by the replay from this process.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use machine_core::{Args, EndedBy, ExitStatus, Machine, Monitor};
use qmp_client::replay::{self, Transcript};
use serde_json::Value;

use crate::stub::{shared, Stub};

/// Every recorded transcript named `name`, one per QEMU version (7.2, 10.0 and 11.1 at least).
fn transcripts(name: &str) -> Vec<Transcript> {
    let all: Vec<Transcript> = replay::recorded()
        .expect("the recorded transcripts load")
        .into_iter()
        .filter(|t| t.name == name)
        .collect();
    for version in ["7.2.", "10.0.", "11.1."] {
        assert!(
            all.iter().any(|t| t.qemu.starts_with(version)),
            "no {name} transcript of QEMU {version}x"
        );
    }
    all
}

/// A stub QEMU whose monitor is the replay of a transcript.
struct Replayed {
    _stub: Stub,
    _dir: tempfile::TempDir,
    /// Serves the monitor, then tells the stub to exit with the recorded status.
    server: Option<JoinHandle<Result<(), String>>>,
}

impl Replayed {
    /// A machine for `transcript`, not launched yet; the replay starts serving once the
    /// machine's monitor socket exists.
    fn start(transcript: &Transcript) -> (Machine, Replayed) {
        let dir = tempfile::tempdir().expect("temp dir");
        let fifo = dir.path().join("exit");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let socket = dir.path().join("mon.sock");
        // The stub waits until told its exit status, as QEMU exits after closing its monitor.
        let stub = Stub::new(&format!(
            "read -r code < '{}'\nexit \"$code\"",
            fifo.display()
        ));
        let mut builder = stub.builder();
        builder.monitor(Monitor::Unix(socket.clone()));
        // The recorded QEMU's devices that decide how its exit reads (isa-debug-exit).
        let argv: Vec<&str> = transcript.header["argv"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for pair in argv.windows(2) {
            if pair[0] == "-device" && pair[1].starts_with("isa-debug-exit") {
                builder.args(["-device", pair[1]]);
            }
        }
        let machine = builder.build();
        let transcript = transcript.clone();
        let server = std::thread::spawn(move || serve(&transcript, &socket, &fifo));
        (
            machine,
            Replayed {
                _stub: stub,
                _dir: dir,
                server: Some(server),
            },
        )
    }

    /// Waits for the replay to end and the stub to be told to exit.
    fn finish(mut self) {
        if let Some(server) = self.server.take() {
            server
                .join()
                .expect("replay thread")
                .expect("replay served the session");
        }
    }
}

/// Connects to the machine's monitor socket as QEMU would, serves the transcript, then writes
/// the recorded exit status to the stub's FIFO.
fn serve(transcript: &Transcript, socket: &Path, fifo: &PathBuf) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(format!("connect {}: {e}", socket.display())),
        }
    };
    let server = transcript
        .script()
        .start_on(stream)
        .map_err(|e| format!("fake server: {e}"))?;
    while !server.finished() {
        if Instant::now() >= deadline {
            return Err("the replay did not reach its end".to_string());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let code = transcript.end.as_ref().and_then(|e| e.exit).unwrap_or(0);
    // Non-blocking, so a stub that is gone (killed by a failing test) cannot hang us; one that
    // has not opened its end yet (bash still starting) is waited for until the deadline.
    let mut exit = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(fifo)
        {
            Ok(file) => break file,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(format!("open {}: {e}", fifo.display())),
        }
    };
    writeln!(exit, "{code}").map_err(|e| format!("write {}: {e}", fifo.display()))
}

fn arguments(command: &Value) -> Args {
    command
        .get("arguments")
        .cloned()
        .map_or_else(Args::none, Args::exact)
}

#[test]
fn every_recorded_session_drives_a_machine_to_our_quit() {
    let _g = shared();
    for transcript in transcripts("session") {
        let name = format!("QEMU {}", transcript.qemu);
        let (mut m, replayed) = Replayed::start(&transcript);
        m.launch().unwrap_or_else(|e| panic!("{name}: launch: {e}"));
        let mut expected_events = Vec::new();
        for exchange in transcript.exchanges() {
            let Some(command) = exchange.command["execute"].as_str() else {
                continue;
            };
            let answers: Vec<Value> = exchange
                .answer
                .iter()
                .map(|m| serde_json::from_str(m.text.trim_end()).expect("recorded JSON"))
                .collect();
            let before_negotiation = answers.iter().any(|a| {
                a["error"]["desc"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("Expecting capabilities"))
            });
            if before_negotiation || command == "qmp_capabilities" || command == "quit" {
                continue;
            }
            expected_events.extend(
                answers
                    .iter()
                    .filter_map(|a| a["event"].as_str().map(str::to_string)),
            );
            let recorded = answers
                .iter()
                .find(|a| a.get("return").is_some() || a.get("error").is_some())
                .unwrap_or_else(|| panic!("{name}: no reply to {command}"));
            let reply = m
                .qmp(command, arguments(&exchange.command))
                .unwrap_or_else(|e| panic!("{name}: {command}: {e}"));
            assert_eq!(
                reply.get("return"),
                recorded.get("return"),
                "{name}: {command}"
            );
            assert_eq!(
                reply.get("error"),
                recorded.get("error"),
                "{name}: {command}"
            );
        }
        let events: Vec<String> = m.events().into_iter().map(|e| e.event).collect();
        assert_eq!(events, expected_events, "{name}: events in QEMU's order");

        let report = m
            .shutdown()
            .unwrap_or_else(|e| panic!("{name}: shutdown: {e}"));
        assert_eq!(report.ended_by, EndedBy::Quit, "{name}: {report}");
        assert_eq!(report.status, ExitStatus::Code(0), "{name}");
        assert_eq!(
            report
                .shutdown_event
                .as_ref()
                .map(|e| (e.guest, e.reason.as_str())),
            Some((false, "host-qmp-quit")),
            "{name}"
        );
        replayed.finish();
    }
}

/// The guest's `exit 5` through isa-debug-exit ends QEMU with status 11. QEMU 10.0 and later
/// first send `SHUTDOWN {guest: true, reason: guest-shutdown}`, the same event as a clean
/// power-off: the exit status must still decide, so the report says QEMU exited with 11.
#[test]
fn every_recorded_guest_exit_is_reported_by_its_exit_status() {
    let _g = shared();
    for transcript in transcripts("guest-exit") {
        let name = format!("QEMU {}", transcript.qemu);
        let (mut m, replayed) = Replayed::start(&transcript);
        m.launch().unwrap_or_else(|e| panic!("{name}: launch: {e}"));
        m.cmd(
            "device_add",
            Args::exact(serde_json::json!({"driver": "usb-kbd", "id": "kbd0", "bus": "usb.0"})),
        )
        .unwrap_or_else(|e| panic!("{name}: device_add: {e}"));
        m.cmd("device_del", Args::exact(serde_json::json!({"id": "kbd0"})))
            .unwrap_or_else(|e| panic!("{name}: device_del: {e}"));
        let deleted = m
            .event_wait(
                "DEVICE_DELETED",
                Some(serde_json::json!({"data": {"device": "kbd0"}})),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|e| panic!("{name}: DEVICE_DELETED: {e}"));
        assert_eq!(deleted.event, "DEVICE_DELETED");
        m.cmd("cont", Args::none())
            .unwrap_or_else(|e| panic!("{name}: cont: {e}"));
        let status = m
            .cmd("query-status", Args::none())
            .unwrap_or_else(|e| panic!("{name}: query-status: {e}"));
        assert_eq!(status["status"], "running", "{name}");

        let report = m
            .wait(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{name}: wait: {e}"));
        assert_eq!(report.status, ExitStatus::Code(11), "{name}: {report}");
        assert!(!report.status.success(), "{name}");
        // The guest wrote 5 to isa-debug-exit: never the guest's clean power-off.
        assert_eq!(
            report.ended_by,
            EndedBy::DebugExit { value: 5 },
            "{name}: {report}"
        );
        let event = report
            .shutdown_event
            .as_ref()
            .map(|e| (e.guest, e.reason.as_str()));
        if transcript.qemu.starts_with("7.") {
            assert_eq!(
                event, None,
                "{name}: 7.2 sends no SHUTDOWN for isa-debug-exit"
            );
        } else {
            assert_eq!(event, Some((true, "guest-shutdown")), "{name}");
        }
        replayed.finish();
    }
}
