//! Framing and content faults (catalogue #12, #13, #17-#20, #22, #23) and pretty-printed input.

use std::time::Duration;

use qmp_client::testing::{Action, Script};
use qmp_client::Error;
use qmp_proto::Command;
use serde_json::json;

use crate::util::{args, config, connect, connect_with};

/// Sends `bytes` in reply to `go` and returns the error `go` got.
fn go_error(bytes: Vec<u8>) -> Error {
    let script = Script::new()
        .on("held", vec![])
        .on("go", vec![Action::Raw(bytes)]);
    let (_server, mut conn) = connect(script);
    let held = conn.send(Command::new("held")).expect("send held");
    let err = conn.execute("go", None).expect_err("go must fail");
    // The sticky failure reaches the other pending command too, at once.
    let other = conn
        .wait_reply(held, std::time::Instant::now() + Duration::from_secs(5))
        .expect_err("held must fail");
    assert!(matches!(other, Error::Disconnected { .. }), "{other:?}");
    assert!(!conn.is_connected());
    err
}

fn decode_cause(err: &Error) -> &qmp_proto::Error {
    match err.root() {
        Error::Decode { source } => source,
        other => panic!("expected a Decode cause, got {other:?}"),
    }
}

/// #12: malformed JSON mid-session ends the session with Decode{raw}.
#[test]
fn malformed_json_mid_session() {
    let err = go_error(b"{\"return\": nope}\r\n".to_vec());
    let cause = decode_cause(&err);
    assert!(
        matches!(cause, qmp_proto::Error::Malformed { .. }),
        "{cause:?}"
    );
    assert!(cause.raw().unwrap().starts_with(b"{\"return\""));
}

/// #13: JSON that is not an object.
#[test]
fn not_an_object() {
    for bytes in [&b"[]\r\n"[..], b"null\r\n", b"42\r\n", b"\"x\"\r\n"] {
        let err = go_error(bytes.to_vec());
        assert!(
            matches!(decode_cause(&err), qmp_proto::Error::NotAnObject { .. }),
            "{err:?}"
        );
    }
}

/// #22: bad bytes from the server.
#[test]
fn bad_bytes() {
    let err = go_error(b"\xff\r\n".to_vec());
    assert!(
        matches!(decode_cause(&err), qmp_proto::Error::InvalidUtf8 { .. }),
        "{err:?}"
    );
    let err = go_error(b"{\"return\": \"\xc3\x28\"}\r\n".to_vec());
    assert!(
        matches!(decode_cause(&err), qmp_proto::Error::InvalidUtf8 { .. }),
        "{err:?}"
    );
    let err = go_error(b"{\"return\": \"\\ud800\"}\r\n".to_vec());
    assert!(
        matches!(decode_cause(&err), qmp_proto::Error::Malformed { .. }),
        "{err:?}"
    );
}

/// #17: EOF in the middle of a message.
#[test]
fn eof_mid_message() {
    let script = Script::new().on(
        "go",
        vec![Action::raw(&b"{\"return\": {\"sta"[..]), Action::Close],
    );
    let (_server, mut conn) = connect(script);
    let (res, took) = crate::util::timed(|| conn.execute("go", None));
    assert!(
        took < Duration::from_secs(1),
        "EOF noticed at once, not at the deadline: {took:?}"
    );
    match res {
        Err(Error::Disconnected { cause }) => match &*cause {
            Error::Eof { partial_len, .. } => assert_eq!(*partial_len, 16),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

/// #18: byte-by-byte writes, LF-only endings and 1000 messages in one write parse the same.
#[test]
fn chunking_and_line_endings() {
    let reply = |id: u64| format!("{{\"return\": {{\"n\": {id}}}, \"id\": {id}}}");
    let script = Script::new()
        .on_fn("bytes", move |cmd| {
            let id = cmd.id.as_ref().unwrap().as_u64().unwrap();
            let line = format!("{}\r\n", reply(id));
            let mut actions: Vec<Action> = line.bytes().map(|b| Action::Raw(vec![b])).collect();
            actions.insert(1, Action::Sleep(Duration::from_millis(5)));
            actions
        })
        .on_fn("lf", move |cmd| {
            let id = cmd.id.as_ref().unwrap().as_u64().unwrap();
            vec![Action::Raw(format!("{}\n", reply(id)).into_bytes())]
        })
        .on_fn("many", |cmd| {
            let mut bytes = Vec::new();
            for i in 0..1000 {
                bytes.extend_from_slice(format!("{{\"event\": \"E\", \"data\": {{\"i\": {i}}}, \"timestamp\": {{\"seconds\": 0, \"microseconds\": 0}}}}\r\n").as_bytes());
            }
            bytes.extend_from_slice(format!("{{\"return\": 1000, \"id\": {}}}\r\n", cmd.id.as_ref().unwrap()).as_bytes());
            vec![Action::Raw(bytes)]
        });
    let (_server, mut conn) = connect(script);
    assert_eq!(conn.execute("bytes", None).unwrap(), json!({"n": 2}));
    assert_eq!(conn.execute("lf", None).unwrap(), json!({"n": 3}));
    assert_eq!(conn.execute("many", None).unwrap(), json!(1000));
    let events = conn.drain_events();
    assert_eq!(events.len(), 1000);
    assert!(events
        .iter()
        .enumerate()
        .all(|(i, e)| e.data.as_ref().unwrap()["i"] == i));
}

/// `-mon pretty=on` output (multi-line JSON) parses (QEMU's `-mon pretty=on`).
#[test]
fn pretty_printed_messages() {
    let script = Script::new()
        .no_greeting()
        .before_greeting(vec![Action::raw(
            &b"{\n    \"QMP\": {\n        \"version\": {\n            \"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7},\n            \"package\": \"\"\n        },\n        \"capabilities\": [\n            \"oob\"\n        ]\n    }\n}\n"[..],
        )])
        .on_fn("q", |cmd| {
            vec![Action::Raw(format!("{{\n    \"return\": {{\n        \"ok\": true\n    }},\n    \"id\": {}\n}}\n", cmd.id.as_ref().unwrap()).into_bytes())]
        });
    let (_server, mut conn) = connect(script);
    assert_eq!(conn.execute("q", None).unwrap(), json!({"ok": true}));
}

/// #19: a reply of exactly the cap parses; cap + 1 is MessageTooLarge and ends the session.
#[test]
fn message_size_cap() {
    const CAP: usize = 1024 * 1024;
    // {"return":"...","id":N} with a one-digit id has 20 bytes besides the string.
    let exact = |id: u64, extra: usize| {
        let overhead = format!("{{\"return\":\"\",\"id\":{id}}}").len();
        let body = "x".repeat(CAP - overhead + extra);
        format!("{{\"return\":\"{body}\",\"id\":{id}}}\r\n").into_bytes()
    };
    let script = Script::new()
        .on_fn("exact", move |cmd| {
            vec![Action::Raw(exact(
                cmd.id.as_ref().unwrap().as_u64().unwrap(),
                0,
            ))]
        })
        .on_fn("over", move |cmd| {
            vec![Action::Raw(exact(
                cmd.id.as_ref().unwrap().as_u64().unwrap(),
                1,
            ))]
        });
    let (_server, conn) = connect_with(script, &config().with_max_message_size(CAP));
    let mut conn = conn.unwrap();
    assert_eq!(
        conn.execute("exact", None).unwrap().as_str().unwrap().len(),
        CAP - 20
    );
    let err = conn.execute("over", None).unwrap_err();
    match decode_cause(&err) {
        qmp_proto::Error::MessageTooLarge { limit, .. } => assert_eq!(*limit, CAP),
        other => panic!("{other:?}"),
    }
}

/// #19 at the default 10 MiB cap.
#[test]
fn ten_mib_reply_parses() {
    const CAP: usize = 10 * 1024 * 1024;
    let script = Script::new().on_fn("big", |cmd| {
        let id = cmd.id.as_ref().unwrap().to_string();
        let overhead = format!("{{\"return\":\"\",\"id\":{id}}}").len();
        vec![Action::Raw(
            format!(
                "{{\"return\":\"{}\",\"id\":{id}}}\r\n",
                "y".repeat(CAP - overhead)
            )
            .into_bytes(),
        )]
    });
    let (_server, mut conn) = connect(script);
    assert_eq!(
        conn.execute("big", None).unwrap().as_str().unwrap().len(),
        CAP - 20
    );
}

/// #20: endless bytes without a newline are bounded by the cap.
#[test]
fn slowloris_is_bounded() {
    const CAP: usize = 64 * 1024;
    let mut actions = vec![Action::raw(&b"{\"return\": \""[..])];
    for _ in 0..100 {
        actions.push(Action::Raw(vec![b'z'; 1024]));
    }
    let script = Script::new().on("go", actions);
    let (_server, conn) = connect_with(script, &config().with_max_message_size(CAP));
    let mut conn = conn.unwrap();
    let err = conn.execute("go", None).expect_err("go must fail");
    assert!(
        matches!(decode_cause(&err), qmp_proto::Error::MessageTooLarge { .. }),
        "{err:?}"
    );
}

/// #23: odd values are data, not failures; an id beyond u64 is an unknown id.
#[test]
fn odd_values() {
    let script = Script::new().on_fn("odd", |cmd| {
        vec![
            Action::raw(&b"{\"return\": 1, \"id\": 123456789012345678901234567890}\r\n"[..]),
            Action::Raw(format!("{{\"return\": {{\"big\": 123456789012345678901234567890, \"neg\": -0, \"k\": 1, \"k\": 2}}, \"id\": {}}}\r\n", cmd.id.as_ref().unwrap()).into_bytes()),
        ]
    });
    let (_server, mut conn) = connect(script);
    let ret = conn.execute("odd", None).unwrap();
    assert_eq!(ret["k"], 2, "duplicate keys: the last wins");
    assert!(ret["big"].is_f64());
    assert_eq!(conn.unknown_replies(), 1);
}

/// A command nested deeper than QEMU's parser accepts is refused before it is sent, with a
/// typed error, and the session carries on; at 1024 levels (QEMU's maximum) it goes out.
#[test]
fn commands_deeper_than_qemu_accepts_are_refused_before_sending() {
    // The command object is level 1, its arguments level 2, and `a` the rest.
    let arguments = |depth: usize| {
        let mut value = json!([]);
        for _ in 0..depth - 3 {
            value = serde_json::Value::Array(vec![value]);
        }
        args(json!({ "a": value }))
    };
    let script = Script::new()
        .on("deep", vec![Action::reply(json!({}))])
        .on("after", vec![Action::reply(json!("fine"))]);
    let (server, mut conn) = connect(script);
    conn.execute("deep", Some(arguments(1024)))
        .expect("1024 levels");
    let err = conn
        .execute("deep", Some(arguments(1025)))
        .expect_err("1025 levels");
    assert!(
        matches!(&err, Error::CommandTooDeep { command, depth: 1025, limit: 1024 } if command == "deep"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "`deep` nests 1025 levels deep; QEMU's JSON parser accepts at most 1024"
    );
    assert_eq!(conn.execute("after", None).expect("after"), json!("fine"));
    let sent: Vec<String> = server
        .commands()
        .into_iter()
        .map(|c| c.execute)
        .filter(|name| name != "qmp_capabilities")
        .collect();
    assert_eq!(sent, ["deep", "after"]);
}

/// #21: nesting of 1024 levels (QEMU's maximum) parses; 1025 ends the session with TooDeep.
#[test]
fn deep_nesting() {
    // The reply object is level 1, so its `return` holds depth - 1 more levels.
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth - 1), "]".repeat(depth - 1));
    let script = Script::new()
        .on_fn("deep", move |cmd| {
            let id = cmd.id.as_ref().unwrap();
            vec![Action::Raw(
                format!("{{\"return\":{},\"id\":{id}}}\r\n", nested(1024)).into_bytes(),
            )]
        })
        .on_fn("deeper", move |cmd| {
            let id = cmd.id.as_ref().unwrap();
            vec![Action::Raw(
                format!("{{\"return\":{},\"id\":{id}}}\r\n", nested(1025)).into_bytes(),
            )]
        });
    let (_server, mut conn) = connect(script);
    assert!(conn.execute("deep", None).unwrap().is_array());
    let err = conn.execute("deeper", None).unwrap_err();
    assert!(
        matches!(
            decode_cause(&err),
            qmp_proto::Error::TooDeep { limit: 1024 }
        ),
        "{err:?}"
    );
}
