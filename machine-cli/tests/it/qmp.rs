//! `qemu-machine qmp`: one command against the fake server, good and bad.

use machine_core::qmp_client::testing::{Action, Script};
use serde_json::{json, Value};
use std::time::Duration;

use crate::util::{dead_path, run, serve};

#[test]
fn prints_the_reply_compact_when_piped() {
    let s = serve(Script::new().on(
        "query-status",
        vec![Action::reply(json!({"status": "running", "running": true}))],
    ));
    let r = run(&["qmp", s.addr(), "query-status"], "", &[]);
    r.expect_code(0);
    assert_eq!(r.stdout, "{\"running\":true,\"status\":\"running\"}\n");
    let commands = s.server.commands();
    assert_eq!(commands.last().unwrap().execute, "query-status");
    assert_eq!(commands.last().unwrap().arguments, None);
}

#[test]
fn pretty_on_request() {
    let s = serve(Script::new().on(
        "query-status",
        vec![Action::reply(json!({"running": true}))],
    ));
    let r = run(&["qmp", "-p", s.addr(), "query-status"], "", &[]);
    r.expect_code(0);
    assert_eq!(r.stdout, "{\n    \"running\": true\n}\n");
}

#[test]
fn key_value_arguments_are_typed_and_nested() {
    let s = serve(Script::new().on("blockdev-add", vec![Action::reply(json!({}))]));
    let r = run(
        &[
            "qmp",
            s.addr(),
            "blockdev-add",
            "driver=null-co",
            "node-name=n0",
            "size=16777216",
            "read-only=FALSE",
            "cache.direct=true",
            "label=\"007\"",
        ],
        "",
        &[],
    );
    r.expect_code(0);
    assert_eq!(r.stdout, "{}\n");
    let args = s
        .server
        .commands()
        .last()
        .unwrap()
        .arguments
        .clone()
        .unwrap();
    assert_eq!(
        Value::Object(args),
        json!({"driver": "null-co", "node-name": "n0", "size": 16777216,
               "read-only": false, "cache": {"direct": true}, "label": "007"})
    );
}

#[test]
fn args_as_json_and_address_from_the_environment() {
    let s = serve(Script::new().on("qom-list", vec![Action::reply(json!([{"name": "type"}]))]));
    let r = run(
        &["qmp", "qom-list", "--args", r#"{"path": "/machine"}"#],
        "",
        &[("QMP_SOCKET", s.addr())],
    );
    r.expect_code(0);
    assert_eq!(r.stdout, "[{\"name\":\"type\"}]\n");
    let args = s
        .server
        .commands()
        .last()
        .unwrap()
        .arguments
        .clone()
        .unwrap();
    assert_eq!(Value::Object(args), json!({"path": "/machine"}));
}

#[test]
fn command_alone_with_key_values_uses_the_environment() {
    let s = serve(Script::new().on("qom-get", vec![Action::reply(json!("q35-machine"))]));
    let r = run(
        &["qmp", "qom-get", "path=/machine", "property=type"],
        "",
        &[("QMP_SOCKET", s.addr())],
    );
    r.expect_code(0);
    assert_eq!(r.stdout, "\"q35-machine\"\n");
}

#[test]
fn qmp_error_reply_is_a_typed_message_and_status_1() {
    let s = serve(Script::new());
    let r = run(&["qmp", s.addr(), "no-such-command"], "", &[]);
    r.expect_code(1);
    assert_eq!(r.stdout, "");
    assert!(r.stderr.contains("no-such-command"), "{}", r.stderr);
    assert!(r.stderr.contains("CommandNotFound"), "{}", r.stderr);
    // One line: printed once.
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);

    let s = serve(Script::new().on(
        "device_del",
        vec![Action::error("DeviceNotFound", "Device 'x' not found")],
    ));
    let r = run(&["qmp", "--json", s.addr(), "device_del", "id=x"], "", &[]);
    r.expect_code(1);
    let printed: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(
        printed,
        json!({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}})
    );
}

#[test]
fn bad_input_fails_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dead_path(dir.path());
    for (args, needle) in [
        (
            vec!["qmp", &nowhere, "cmd", "novalue"],
            "expected key=value",
        ),
        (vec!["qmp", &nowhere, "cmd", "a=1", "a=2"], "multiple times"),
        (
            vec!["qmp", &nowhere, "cmd", "a=1", "a.b=2"],
            "both leaf and non-leaf",
        ),
        (vec!["qmp", &nowhere, "cmd", "o={\"a\":"], "invalid JSON"),
        (
            vec!["qmp", &nowhere, "cmd", "--args", "[1]"],
            "must be a JSON object",
        ),
        (vec!["qmp", &nowhere, "cmd", "--args", "{"], "invalid JSON"),
        (vec!["qmp", "query-status"], "QMP_SOCKET"),
        (vec!["qmp", &nowhere], "no QMP command"),
    ] {
        let r = run(&args, "", &[]);
        r.expect_code(2);
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn unreachable_socket_is_status_3_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dead_path(dir.path());
    let r = run(&["qmp", &nowhere, "query-status"], "", &[]);
    r.expect_code(3);
    // One line says what failed and why.
    assert_eq!(
        r.stderr.trim_end(),
        format!(
            "qemu-machine: cannot connect to QMP server at {nowhere}: No such file or \
             directory (os error 2)"
        ),
    );
    let r = run(&["qmp", "127.0.0.1:1", "query-status"], "", &[]);
    r.expect_code(3);
}

#[test]
fn garbage_reply_is_status_3() {
    let s = serve(Script::new().on(
        "query-status",
        vec![Action::raw(b"this is not json\r\n".to_vec())],
    ));
    let r = run(
        &["qmp", s.addr(), "query-status", "--timeout", "2s"],
        "",
        &[],
    );
    r.expect_code(3);
    assert!(r.stderr.contains("query-status"), "{}", r.stderr);
}

#[test]
fn disconnect_before_the_reply_is_status_3() {
    let s = serve(Script::new().on("query-status", vec![Action::Close]));
    let r = run(&["qmp", s.addr(), "query-status"], "", &[]);
    r.expect_code(3);
    assert!(r.stderr.contains("query-status"), "{}", r.stderr);
}

#[test]
fn reply_timeout_is_status_3_on_time() {
    let s = serve(Script::new().on("query-status", vec![Action::Stall]));
    let r = run(
        &["qmp", s.addr(), "query-status", "--timeout", "300ms"],
        "",
        &[],
    );
    r.expect_code(3);
    assert!(r.stderr.contains("no reply"), "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
}

#[test]
fn greeting_that_never_comes_is_status_3_on_time() {
    let s = serve(Script::new().before_greeting(vec![Action::Stall]));
    let r = run(
        &[
            "qmp",
            s.addr(),
            "query-status",
            "--connect-timeout",
            "300ms",
        ],
        "",
        &[],
    );
    r.expect_code(3);
    assert!(r.stderr.contains("greeting"), "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
}

#[test]
fn quit_is_a_success_even_when_the_server_just_closes() {
    let s = serve(Script::new().on("quit", vec![Action::Close]));
    let r = run(&["qmp", s.addr(), "quit"], "", &[]);
    r.expect_code(0);
}

#[test]
fn skip_negotiation_talks_to_a_server_without_greeting() {
    // qemu-ga speaks QMP without greeting or capabilities negotiation.
    let s = serve(
        Script::new()
            .no_greeting()
            .on("guest-ping", vec![Action::reply(json!({}))]),
    );
    let r = run(
        &["qmp", "-N", s.addr(), "guest-ping", "--timeout", "5s"],
        "",
        &[],
    );
    r.expect_code(0);
    assert_eq!(r.stdout, "{}\n");
    let names: Vec<String> = s.server.commands().into_iter().map(|c| c.execute).collect();
    assert_eq!(names, ["guest-ping"]);
}
