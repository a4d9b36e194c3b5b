//! `qemu-machine run` against stub QEMUs: what the last lines say, and the exit status.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use crate::util::{run, Run};

/// A stub QEMU (bash): greets on the monitor fd, answers `qmp_capabilities`, prints `ready` on
/// the console fd, then runs `body` (`$MON` and `$CON` are the two fds).
struct Stub {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

const PRELUDE: &str = r#"#!/bin/bash
for a in "$@"; do
  case "$a" in
    socket,id=mon,fd=*) MON=${a#socket,id=mon,fd=};;
    socket,id=console,fd=*) CON=${a#socket,id=console,fd=};;
  esac
done
reply() {
  local cmd id
  IFS= read -r -d '}' -u $MON cmd || exit 0
  id=null
  [[ $cmd =~ \"id\":([0-9]+) ]] && id=${BASH_REMATCH[1]}
  LAST=$cmd
  printf '{"return": {}, "id": %s}\r\n' "$id" >&$MON
}
event() {
  printf '{"event": "%s", "data": %s, "timestamp": {"seconds": 1700000000, "microseconds": 5}}\r\n' "$1" "$2" >&$MON
}
printf '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": "stub"}, "capabilities": []}}\r\n' >&$MON
reply
printf 'ready\r\n' >&$CON
"#;

impl Stub {
    fn new(body: &str) -> Stub {
        let dir = tempfile::tempdir().expect("stub dir");
        let path = dir.path().join("qemu-stub");
        std::fs::write(&path, format!("{PRELUDE}{body}\n")).expect("write stub");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Stub { _dir: dir, path }
    }

    /// `qemu-machine run --qemu STUB --banner ready OPTIONS -- QEMU_ARGS`.
    fn run(&self, options: &[&str], qemu_args: &[&str]) -> Run {
        let mut args = vec![
            "run",
            "--qemu",
            self.path.to_str().expect("utf-8"),
            "--banner",
            "ready",
        ];
        args.extend(options);
        args.push("--");
        args.extend(qemu_args);
        run(&args, "", &[])
    }
}

const DEBUG_EXIT: [&str; 2] = ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"];

/// QEMU 10 and later send `SHUTDOWN {"guest": true, "reason": "guest-shutdown"}` before an
/// isa-debug-exit exit: the exit status (11) decides, so `run` fails with it and says why.
#[test]
fn a_guest_shutdown_event_then_exit_11_fails_with_11() {
    // Waits for the --send line on the console, then does what QEMU 10 does for `exit 5`.
    let stub = Stub::new(
        r#"read -r -n 6 -u $CON line
event SHUTDOWN '{"guest": true, "reason": "guest-shutdown"}'
exit 11"#,
    );
    let r = stub.run(&["--send", "exit 5"], &DEBUG_EXIT);
    r.expect_code(11);
    let last = r
        .stderr
        .lines()
        .find(|l| l.contains("isa-debug-exit:"))
        .unwrap_or_else(|| panic!("no summary line:\n{}", r.stderr));
    assert!(
        last.contains(
            "] the guest asked to exit with 5 through isa-debug-exit: exit code 11 ((5 << 1) | 1) \
             after "
        ),
        "{last}"
    );
    assert!(
        last.contains("(qemu sent SHUTDOWN guest: guest-shutdown first)"),
        "{last}"
    );
    // Not clean: the full report follows.
    assert!(r.stderr.contains("  command: "), "{}", r.stderr);
    assert!(r.stderr.contains("  console | ready"), "{}", r.stderr);

    // Without the device, the code is QEMU's own.
    let r = stub.run(&["--send", "exit 5"], &["-M", "none"]);
    r.expect_code(11);
    assert!(
        r.stderr
            .contains("qemu exited by itself: exit code 11 after"),
        "{}",
        r.stderr
    );
}

/// A guest that powers off when asked: one line by default, the full report with
/// `--report full`, nothing with `--report none`.
#[test]
fn a_clean_stop_prints_one_line_unless_asked_for_more() {
    // Answers system_powerdown, then powers off like a guest does.
    let stub = Stub::new(
        r#"reply
event POWERDOWN null
event SHUTDOWN '{"guest": true, "reason": "guest-shutdown"}'
exit 0"#,
    );
    // The guest's power-off may be seen while the ladder's powerdown step waits ("... after
    // our system_powerdown: ...") or just before the ladder records it; both are this line.
    let is_summary =
        |l: &str| l.contains("the guest powered off") && l.contains(": exit code 0 after");
    for (options, lines_after) in [
        (vec![], Some(0)),
        (vec!["--report", "short"], Some(0)),
        (vec!["--report", "full"], None),
        (vec!["--report", "none"], Some(usize::MAX)),
    ] {
        let mut all = vec!["--exit-after-banner"];
        all.extend(options.iter().copied());
        let r = stub.run(&all, &["-M", "none"]);
        r.expect_code(0);
        let lines: Vec<&str> = r.stderr.lines().collect();
        let at = lines.iter().position(|l| is_summary(l));
        match lines_after {
            Some(usize::MAX) => assert!(at.is_none(), "{options:?}:\n{}", r.stderr),
            Some(n) => {
                let at = at.unwrap_or_else(|| panic!("{options:?}: no summary:\n{}", r.stderr));
                assert_eq!(lines.len() - at - 1, n, "{options:?}:\n{}", r.stderr);
            }
            None => {
                assert!(at.is_some(), "{options:?}: no summary:\n{}", r.stderr);
                assert!(
                    lines.last().is_some_and(|l| l.starts_with("  command: ")),
                    "{options:?}:\n{}",
                    r.stderr
                );
            }
        }
    }
}

/// Stopped by SIGTERM, `run` names SIGTERM as the signal that kills when sent again.
#[test]
fn the_stop_line_names_the_signal_received() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let stub = Stub::new(
        r#"reply
event SHUTDOWN '{"guest": true, "reason": "guest-shutdown"}'
exit 0"#,
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_qemu-machine"))
        .args(["run", "--qemu"])
        .arg(&stub.path)
        .args(["--banner", "ready", "--", "-M", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // The banner is on stdout once the stub is up.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("ready") {
        let n = stdout.read(&mut buf).expect("read stdout");
        assert!(n > 0, "stdout closed before the banner");
        seen.extend_from_slice(&buf[..n]);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "run did not end after SIGTERM");
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(
            "SIGTERM: system_powerdown (up to 5s; another SIGTERM or Ctrl-C kills at once)"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("Ctrl-C again"), "{stderr}");
}

/// Lifecycle and event lines never cut the console's text: an event that arrives while the
/// guest is half-way through a line is printed after the line ends (stdout and stderr here
/// go to one file, as on a terminal).
#[test]
fn event_lines_wait_for_the_end_of_a_console_line() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let stub = Stub::new(
        r#"read -r -n 2 -u $CON line
printf 'POW' >&$CON
sleep 0.05
event POWERDOWN null
sleep 0.05
printf 'ER-BUTTON\r\n' >&$CON
sleep 0.05
event SHUTDOWN '{"guest": true, "reason": "guest-shutdown"}'
exit 0"#,
    );
    let dir = tempfile::tempdir().expect("dir");
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path).expect("out file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qemu-machine"))
        .args(["run", "--qemu"])
        .arg(&stub.path)
        .args(["--banner", "ready", "--send", "go", "--", "-M", "none"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone"))
        .stderr(out)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "run did not end");
        std::thread::sleep(Duration::from_millis(5));
    };
    let text = std::fs::read_to_string(&out_path).expect("output");
    assert_eq!(status.code(), Some(0), "{text}");
    let button = text
        .find("POWER-BUTTON\r\n")
        .unwrap_or_else(|| panic!("the console line was cut:\n{text}"));
    let event = text.find(" POWERDOWN").expect("the event line");
    assert!(
        event > button,
        "the event came before the line's end:\n{text}"
    );
}
