//! `qemu-machine events`: the stream, its filters, its end.

use machine_core::qmp_client::testing::{Action, Script};
use serde_json::{json, Value};

use crate::util::{run, serve};

/// A server that answers the negotiation, then runs `actions`.
fn after_negotiation(mut actions: Vec<Action>) -> Script {
    actions.insert(0, Action::reply(json!({})));
    Script::new().on("qmp_capabilities", actions)
}

fn three_events_then_close() -> Script {
    after_negotiation(vec![
        Action::event("STOP", None),
        Action::event("RESUME", None),
        Action::event("SHUTDOWN", Some(json!({"guest": false, "reason": "host-qmp-quit"}))),
        Action::Close,
    ])
}

#[test]
fn human_lines_until_eof() {
    let s = serve(three_events_then_close());
    let r = run(&["events", s.addr()], "", &[]);
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
    let s = serve(three_events_then_close());
    let r = run(
        &["events", s.addr(), "--json", "--name", "shutdown", "--name", "STOP"],
        "",
        &[],
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
    let s = serve(after_negotiation(vec![
        Action::event("STOP", None),
        Action::event("RESUME", None),
        Action::Stall,
    ]));
    let r = run(&["events", s.addr(), "--count", "2"], "", &[]);
    r.expect_code(0);
    assert_eq!(r.lines().len(), 2);
}

#[test]
fn timeout_ends_a_quiet_stream() {
    let s = serve(after_negotiation(vec![Action::Stall]));
    let r = run(&["events", s.addr(), "--timeout", "200ms"], "", &[]);
    r.expect_code(0);
    assert_eq!(r.stdout, "");
}

#[test]
fn garbage_in_the_stream_does_not_panic() {
    let s = serve(after_negotiation(vec![
        Action::event("STOP", None),
        Action::raw(b"{\"event\": oops}\r\n".to_vec()),
        Action::event("RESUME", None),
        Action::Close,
    ]));
    let r = run(&["events", s.addr()], "", &[]);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(matches!(r.code, Some(0) | Some(3)), "{r:?}");
    assert!(r.stdout.lines().next().unwrap_or("").ends_with(" STOP"), "{r:?}");
}

#[test]
fn address_from_the_environment() {
    let s = serve(three_events_then_close());
    let r = run(&["events", "--count", "1"], "", &[("QMP_SOCKET", s.addr())]);
    r.expect_code(0);
    assert_eq!(r.lines().len(), 1);
}
