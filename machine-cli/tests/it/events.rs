//! `qemu-machine events`: the stream, its filters, its end.

use machine_core::qmp_client::testing::{Action, Script};
use serde_json::{json, Value};

use crate::util::{serve, wait_negotiated, Live, Run, Served};

/// After the first STOP: two more events, then EOF.
fn two_events_then_close() -> Vec<Action> {
    vec![
        Action::event("RESUME", None),
        Action::event(
            "SHUTDOWN",
            Some(json!({"guest": false, "reason": "host-qmp-quit"})),
        ),
        Action::Close,
    ]
}

/// Runs `events ARGS` against a fresh server. Once the client is in, the server sends a
/// first STOP event; once the binary has printed it (so it is streaming), `actions` follow.
fn events(args: &[&str], env_address: bool, actions: Vec<Action>) -> Run {
    let s: Served = serve(Script::new());
    let mut argv = vec!["events"];
    let env: Vec<(&str, &str)> = if env_address {
        vec![("QMP_SOCKET", s.addr())]
    } else {
        argv.push(s.addr());
        vec![]
    };
    argv.extend_from_slice(args);
    let mut live = Live::start(&argv, &env);
    wait_negotiated(&s.server);
    s.server.inject(vec![Action::event("STOP", None)]);
    assert!(live.next_line().contains("STOP"));
    s.server.inject(actions);
    live.finish()
}

#[test]
fn human_lines_until_eof() {
    let r = events(&[], false, two_events_then_close());
    r.expect_code(0);
    let lines = r.lines();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    // 2026-11-25T16:30:08.123456Z STOP
    assert!(lines[0].ends_with("Z STOP"), "{}", lines[0]);
    assert_eq!(lines[0].find('T'), Some(10), "{}", lines[0]);
    assert!(lines[1].ends_with(" RESUME"));
    assert!(
        lines[2].ends_with(r#" SHUTDOWN {"guest":false,"reason":"host-qmp-quit"}"#),
        "{}",
        lines[2]
    );
    assert!(r.stderr.contains("closed the connection"), "{}", r.stderr);
}

#[test]
fn json_lines_and_name_filter() {
    let r = events(
        &["--json", "--name", "shutdown", "--name", "STOP"],
        false,
        two_events_then_close(),
    );
    r.expect_code(0);
    let events: Vec<Value> = r
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{}", r.stdout);
    assert_eq!(events[0]["event"], "STOP");
    assert_eq!(events[1]["event"], "SHUTDOWN");
    assert_eq!(events[1]["data"]["reason"], "host-qmp-quit");
    assert!(events[1]["timestamp"]["seconds"].as_i64().unwrap() > 0);
}

#[test]
fn count_ends_the_stream() {
    let r = events(
        &["--count", "2"],
        false,
        vec![
            Action::event("RESUME", None),
            Action::event("STOP", None),
            Action::Stall,
        ],
    );
    r.expect_code(0);
    assert_eq!(r.lines().len(), 2);
}

#[test]
fn timeout_ends_a_quiet_stream() {
    let r = events(&["--timeout", "1s"], false, vec![Action::Stall]);
    r.expect_code(0);
    assert_eq!(r.lines().len(), 1);
}

#[test]
fn garbage_in_the_stream_is_reported_not_a_crash() {
    let r = events(
        &[],
        false,
        vec![
            Action::raw(b"{\"event\": oops}\r\n".to_vec()),
            Action::event("RESUME", None),
            Action::Stall,
        ],
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(
        r.stdout.lines().next().unwrap_or("").ends_with(" STOP"),
        "{r:?}"
    );
    r.expect_code(3);
    assert!(r.stderr.contains("malformed"), "{}", r.stderr);
}

#[test]
fn address_from_the_environment() {
    let r = events(&["--count", "2"], true, two_events_then_close());
    r.expect_code(0);
    assert_eq!(r.lines().len(), 2);
}
