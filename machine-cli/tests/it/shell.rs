//! `qemu-machine shell` with piped stdin: the language, events, HMP mode, logging, and the
//! ways a session ends.

use machine_core::qmp_client::testing::{Action, Script};
use serde_json::{json, Value};

use crate::util::{run, serve, Terminal};

fn qemu_like() -> Script {
    Script::new()
        .on(
            "query-status",
            vec![Action::reply(json!({"status": "running", "running": true}))],
        )
        .on(
            "stop",
            vec![Action::event("STOP", None), Action::reply(json!({}))],
        )
        .on("transaction", vec![Action::reply(json!({}))])
        .on(
            "quit",
            vec![
                Action::event(
                    "SHUTDOWN",
                    Some(json!({"guest": false, "reason": "host-qmp-quit"})),
                ),
                Action::reply(json!({})),
                Action::Close,
            ],
        )
        .on_fn("human-monitor-command", |cmd| {
            let args = cmd.arguments.clone().unwrap_or_default();
            if args.get("cpu-index").and_then(Value::as_u64) == Some(7) {
                return vec![Action::error("GenericError", "Invalid CPU index")];
            }
            let line = args
                .get("command-line")
                .and_then(Value::as_str)
                .unwrap_or("");
            vec![Action::reply(json!(format!("ran: {line}\r\n")))]
        })
}

#[test]
fn commands_replies_and_events_in_order() {
    let s = serve(qemu_like());
    let r = run(&["shell", s.addr()], "query-status\n\n   \nstop\n", &[]);
    r.expect_code(0);
    let lines = r.lines();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert_eq!(
        lines[0],
        r#"{"return":{"running":true,"status":"running"}}"#
    );
    assert!(lines[1].ends_with(" STOP"), "{}", lines[1]);
    assert_eq!(lines[2], r#"{"return":{}}"#);
}

#[test]
fn transactions_multi_line_and_one_line() {
    let s = serve(qemu_like());
    let input = "transaction(\n\
                 block-dirty-bitmap-add node=d0 name=b0\n\
                 \n\
                 block-dirty-bitmap-clear node=d0 name=b1\n\
                 )\n\
                 transaction( abort ; abort )\n";
    let r = run(&["shell", s.addr()], input, &[]);
    r.expect_code(0);
    let sent: Vec<_> = s
        .server
        .commands()
        .into_iter()
        .filter(|c| c.execute == "transaction")
        .map(|c| Value::Object(c.arguments.unwrap()))
        .collect();
    assert_eq!(
        sent,
        vec![
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b0"}},
                {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "b1"}}]}),
            json!({"actions": [{"type": "abort", "data": {}}, {"type": "abort", "data": {}}]}),
        ]
    );
}

#[test]
fn bad_lines_are_reported_and_the_session_goes_on() {
    let s = serve(qemu_like());
    let r = run(
        &["shell", s.addr()],
        "query-status novalue\nquery-status a=1 a=2\n)\nno-such-command\nquery-status\n",
        &[],
    );
    r.expect_code(1);
    let errors: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 3, "{}", r.stderr);
    assert!(errors[0].contains("expected key=value"));
    assert!(errors[1].contains("multiple times"));
    assert!(errors[2].contains("outside a transaction"));
    let lines = r.lines();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    assert!(lines[0].contains("CommandNotFound"), "{}", lines[0]);
    assert_eq!(
        lines[1],
        r#"{"return":{"running":true,"status":"running"}}"#
    );
    assert!(
        r.stderr.contains("4 of 5 shell lines failed"),
        "{}",
        r.stderr
    );
}

#[test]
fn hmp_mode_with_cpu_selection_and_blank_lines() {
    let s = serve(qemu_like());
    let r = run(
        &["shell", "-H", s.addr()],
        "info version\n   \n\t\ncpu 7\ncpu x\ncpu 2\ninfo registers\n",
        &[],
    );
    r.expect_code(1);
    assert_eq!(r.lines(), vec!["ran: info version", "ran: info registers"]);
    assert!(r.stderr.contains("Invalid CPU index"), "{}", r.stderr);
    assert!(r.stderr.contains("usage: cpu INDEX"), "{}", r.stderr);
    let hmp: Vec<Value> = s
        .server
        .commands()
        .into_iter()
        .filter(|c| c.execute == "human-monitor-command")
        .map(|c| Value::Object(c.arguments.unwrap()))
        .collect();
    assert_eq!(
        hmp,
        vec![
            json!({"command-line": "info version"}),
            json!({"command-line": "info version", "cpu-index": 7}),
            json!({"command-line": "info version", "cpu-index": 2}),
            json!({"command-line": "info registers", "cpu-index": 2}),
        ]
    );
}

#[test]
fn verbose_pretty_and_log_file() {
    let s = serve(qemu_like());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("session.log");
    let r = run(
        &["shell", "-v", "-p", "-l", log.to_str().unwrap(), s.addr()],
        "query-status\n",
        &[],
    );
    r.expect_code(0);
    assert_eq!(
        r.stdout,
        "{\n    \"execute\": \"query-status\"\n}\n\
         {\n    \"return\": {\n        \"running\": true,\n        \"status\": \"running\"\n    }\n}\n"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    let entry: Value = serde_json::from_str(logged.trim()).unwrap();
    assert_eq!(
        entry,
        json!({"execute": "query-status", "return": {"running": true, "status": "running"}})
    );
}

#[test]
fn quit_ends_the_session_cleanly() {
    let s = serve(qemu_like());
    let r = run(&["shell", s.addr()], "quit\nquery-status\n", &[]);
    r.expect_code(0);
    assert!(r.stdout.contains("SHUTDOWN"), "{}", r.stdout);
    assert!(r.stderr.contains("closed the connection"), "{}", r.stderr);
}

#[test]
fn a_disconnect_is_reported_not_a_crash() {
    let s = serve(Script::new().on("query-status", vec![Action::Close]));
    let r = run(&["shell", s.addr()], "query-status\nquery-status\n", &[]);
    r.expect_code(3);
    assert!(r.stderr.contains("disconnected"), "{}", r.stderr);
}

#[test]
fn garbage_reply_is_reported_not_a_crash() {
    let s = serve(Script::new().on(
        "query-status",
        vec![Action::raw(b"\x00\xffgarbage\r\n".to_vec())],
    ));
    let r = run(
        &["shell", "--timeout", "2s", s.addr()],
        "query-status\n",
        &[],
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(matches!(r.code, Some(1) | Some(3)), "{r:?}");
}

#[test]
fn unreachable_socket_is_status_3() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(
        &["shell", &crate::util::dead_path(dir.path())],
        "query-status\n",
        &[],
    );
    r.expect_code(3);
    assert!(r.stderr.contains("cannot connect"), "{}", r.stderr);
}

/// On a terminal, an event is printed while the user sits at the prompt (qmp-shell waits for
/// an empty line), history is written, and Ctrl-D leaves.
#[test]
fn on_a_terminal_events_show_up_while_idle_at_the_prompt() {
    use std::time::Duration;

    let s = serve(qemu_like());
    let home = tempfile::tempdir().unwrap();
    let mut term = Terminal::spawn(
        &["shell", s.addr()].map(std::ffi::OsStr::new),
        &[("HOME", home.path().as_os_str())],
    );
    term.wait_for("(QEMU) ");
    s.server.inject(vec![Action::event(
        "BLOCK_JOB_READY",
        Some(json!({"device": "job0"})),
    )]);
    term.wait_for("BLOCK_JOB_READY {\"device\":\"job0\"}");
    // Typed key by key, as a person does (rustyline 15 may leave the rest of a burst of bytes
    // unprocessed until the next key when its external printer is in use).
    // Each key is sent once the previous one is echoed (no two adjacent keys are equal).
    for key in "query-status".chars() {
        term.type_bytes(key.to_string().as_bytes());
        term.wait_until(&format!("the echo of {key:?}"), |seen| seen.ends_with(key));
    }
    term.type_bytes(b"\r");
    let reply = r#"{"return":{"running":true,"status":"running"}}"#;
    term.wait_for(reply);
    // Ctrl-D only once the next prompt is up: typed earlier, the terminal (not yet back in
    // raw mode) would take it as its own end-of-file.
    let after = term.seen.find(reply).unwrap() + reply.len();
    term.wait_until("a prompt after the reply", |seen| {
        seen[after..].contains("(QEMU) ")
    });
    term.type_bytes(b"\x04");
    let status = term.wait_exit(Duration::from_secs(10), "Ctrl-D");
    assert_eq!(status.code(), Some(0), "{:?}", term.seen);
    let history = std::fs::read_to_string(home.path().join(".qemu-machine_history")).unwrap();
    assert!(history.lines().any(|l| l == "query-status"), "{history:?}");
}

/// A stub QEMU for `wrap`: greets on its `-chardev socket,id=mon,fd=N`, answers every command
/// with `{}` (`quit`: then exits), and sends one event once the file `$WRAP_TRIGGER` exists.
const WRAP_STUB: &str = r#"#!/bin/bash
for a in "$@"; do
  case "$a" in socket,id=mon,fd=*) MON=${a#socket,id=mon,fd=};; esac
done
printf '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}\r\n' >&$MON
while true; do
  if [ -z "$sent" ] && [ -e "$WRAP_TRIGGER" ]; then
    printf '{"event": "BLOCK_JOB_READY", "data": {"device": "job0"}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n' >&$MON
    sent=1
  fi
  if IFS= read -r -t 0.05 -d '}' -u $MON cmd; then
    id=null
    [[ $cmd =~ \"id\":([0-9]+) ]] && id=${BASH_REMATCH[1]}
    printf '{"return": {}, "id": %s}\r\n' "$id" >&$MON
    case "$cmd" in *'"quit"'*) exit 0;; esac
  elif [ $? -le 128 ]; then
    exit 0
  fi
done
"#;

/// `wrap` on a terminal prints an event while the user sits at the prompt, like `shell`
/// (it used to show events only after the next line, as its machine owned the connection).
#[test]
fn wrap_on_a_terminal_shows_events_while_idle_at_the_prompt() {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let stub = dir.path().join("qemu-stub");
    std::fs::write(&stub, WRAP_STUB).unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let trigger = dir.path().join("send-event");
    let mut term = Terminal::spawn(
        &[
            "wrap".as_ref(),
            "--qemu".as_ref(),
            stub.as_os_str(),
            "--".as_ref(),
            "-M".as_ref(),
            "none".as_ref(),
        ],
        &[
            ("HOME", dir.path().as_os_str()),
            ("WRAP_TRIGGER", trigger.as_os_str()),
        ],
    );
    term.wait_for("(QEMU) ");
    std::fs::write(&trigger, b"").unwrap();
    // Nothing typed: the event must show up by itself.
    term.wait_for("BLOCK_JOB_READY {\"device\":\"job0\"}");
    term.type_bytes(b"\x04");
    let status = term.wait_exit(Duration::from_secs(15), "Ctrl-D");
    assert_eq!(status.code(), Some(0), "{:?}", term.seen);
    // Ended by our quit after Ctrl-D: the rest of the output (the report) until the
    // terminal hangs up.
    term.read_to_hangup(Duration::from_secs(5));
    assert!(
        term.seen.contains("qemu quit on our request"),
        "{:?}",
        term.seen
    );
}
