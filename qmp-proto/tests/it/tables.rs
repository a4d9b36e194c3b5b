//! Tables of bytes in and messages out: framing and classification.

use qmp_proto::{
    ErrorClass, ErrorInfo, ErrorReply, Event, Greeting, QemuVersion, ReturnReply, ServerMessage,
    Timestamp, Version,
};
use serde_json::{json, Value};

use crate::util::{decode, decode_bytewise, Outcome};

fn ok(message: ServerMessage) -> Outcome {
    Outcome::Message(message)
}

fn ret(value: Value, id: Option<Value>) -> Outcome {
    ok(ServerMessage::Return(ReturnReply { ret: value, id }))
}

fn unknown(value: Value) -> Outcome {
    match value {
        Value::Object(map) => ok(ServerMessage::Unknown(map)),
        other => panic!("not an object: {other}"),
    }
}

fn event(name: &str, data: Option<Value>, seconds: i64, microseconds: i64) -> Outcome {
    ok(ServerMessage::Event(Event {
        event: name.into(),
        data,
        timestamp: Timestamp {
            seconds,
            microseconds,
        },
    }))
}

fn check(table: &[(&str, &[u8], Vec<Outcome>)]) {
    for (name, input, expected) in table {
        assert_eq!(&decode(input), expected, "case {name}: single feed");
        assert_eq!(
            &decode_bytewise(Default::default(), input),
            expected,
            "case {name}: byte by byte"
        );
    }
}

#[test]
fn framing() {
    let table: Vec<(&str, &[u8], Vec<Outcome>)> = vec![
        ("lf", b"{\"return\": {}}\n", vec![ret(json!({}), None)]),
        ("crlf", b"{\"return\": {}}\r\n", vec![ret(json!({}), None)]),
        ("no terminator yet", b"{\"return\": {}}", vec![ret(json!({}), None)]),
        ("incomplete", b"{\"return\": {}", vec![]),
        ("only whitespace", b" \r\n\t\n", vec![]),
        (
            "back to back",
            b"{\"return\":1}{\"return\":2}",
            vec![ret(json!(1), None), ret(json!(2), None)],
        ),
        (
            "blank lines and indentation between",
            b"\r\n\r\n  {\"return\":1}  \r\n\n\t{\"return\":2}\n\n",
            vec![ret(json!(1), None), ret(json!(2), None)],
        ),
        (
            "pretty printed with crlf",
            b"{\r\n    \"return\": {\r\n        \"a\": [\r\n            1\r\n        ]\r\n    },\r\n    \"id\": 3\r\n}\r\n",
            vec![ret(json!({"a": [1]}), Some(json!(3)))],
        ),
        (
            "brackets and quotes inside strings",
            br#"{"return": "}{][\"\\", "id": "{"}"#,
            vec![ret(json!("}{][\"\\"), Some(json!("{")))],
        ),
        (
            "escaped backslash before closing quote",
            b"{\"return\": \"a\\\\\"}\r\n{\"return\": 2}\r\n",
            vec![ret(json!("a\\"), None), ret(json!(2), None)],
        ),
        (
            "unicode text and escapes",
            "{\"return\": \"d\u{e9}j\u{e0} \\u00e9 \\ud83d\\ude00 \u{1f600}\"}\n".as_bytes(),
            vec![ret(json!("d\u{e9}j\u{e0} \u{e9} \u{1f600} \u{1f600}"), None)],
        ),
        (
            "top-level array of objects is still framed",
            b"[{\"return\": 1}]\n{\"return\": 2}\n",
            vec![
                Outcome::Failed {
                    kind: "NotAnObject",
                    raw: b"[{\"return\": 1}]".to_vec(),
                },
                ret(json!(2), None),
            ],
        ),
    ];
    check(&table);
}

#[test]
fn classification() {
    let greeting = |major, minor, micro, package: &str, caps: &[&str]| {
        ok(ServerMessage::Greeting(Greeting {
            version: Version {
                qemu: QemuVersion {
                    major,
                    minor,
                    micro,
                },
                package: package.into(),
            },
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
        }))
    };
    let error = |class: ErrorClass, desc: &str, id: Option<Value>| {
        ok(ServerMessage::Error(ErrorReply {
            error: ErrorInfo {
                class,
                desc: desc.into(),
            },
            id,
        }))
    };
    let table: Vec<(&str, &[u8], Vec<Outcome>)> = vec![
        (
            "greeting",
            br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#,
            vec![greeting(7, 2, 22, "Debian", &["oob"])],
        ),
        (
            "greeting with missing and unknown members",
            br#"{"QMP": {"version": {"qemu": {"major": 9}}, "capabilities": ["oob", 5, "x-new"], "x-extra": 1}, "x-top": []}"#,
            vec![greeting(9, 0, 0, "", &["oob", "x-new"])],
        ),
        ("greeting not an object", br#"{"QMP": 1}"#, vec![unknown(json!({"QMP": 1}))]),
        (
            "return of every type",
            br#"{"return": [1, "a"]}{"return": 5}{"return": "s"}{"return": null}{"return": true}"#,
            vec![
                ret(json!([1, "a"]), None),
                ret(json!(5), None),
                ret(json!("s"), None),
                ret(json!(null), None),
                ret(json!(true), None),
            ],
        ),
        (
            "ids of every type",
            br#"{"return": {}, "id": 1}{"id": "x", "return": {}}{"return": {}, "id": {"a": [1]}}{"return": {}, "id": null}{"return": {}, "id": 1.5}"#,
            vec![
                ret(json!({}), Some(json!(1))),
                ret(json!({}), Some(json!("x"))),
                ret(json!({}), Some(json!({"a": [1]}))),
                ret(json!({}), Some(json!(null))),
                ret(json!({}), Some(json!(1.5))),
            ],
        ),
        (
            "unknown keys in a reply are ignored",
            br#"{"return": 1, "id": 2, "x-future": {"a": 1}}"#,
            vec![ret(json!(1), Some(json!(2)))],
        ),
        (
            "error classes",
            br#"{"error": {"class": "GenericError", "desc": "d1"}}
{"id": 6, "error": {"class": "CommandNotFound", "desc": "d2"}}
{"error": {"class": "DeviceNotActive", "desc": "d3"}, "id": "a"}
{"error": {"class": "DeviceNotFound", "desc": "d4"}}
{"error": {"class": "KVMMissingCap", "desc": "d5", "x-extra": 1}}
{"error": {"class": "FutureClass", "desc": "d6"}}"#,
            vec![
                error(ErrorClass::GenericError, "d1", None),
                error(ErrorClass::CommandNotFound, "d2", Some(json!(6))),
                error(ErrorClass::DeviceNotActive, "d3", Some(json!("a"))),
                error(ErrorClass::DeviceNotFound, "d4", None),
                error(ErrorClass::KVMMissingCap, "d5", None),
                error(ErrorClass::Other("FutureClass".into()), "d6", None),
            ],
        ),
        (
            "events",
            br#"{"timestamp": {"seconds": 1795624638, "microseconds": 4076}, "event": "STOP"}
{"event": "SHUTDOWN", "data": {"guest": false}, "timestamp": {"seconds": -1, "microseconds": -1}}
{"event": "NO_TIMESTAMP"}
{"event": "BAD_TIMESTAMP", "timestamp": {"seconds": "x", "microseconds": 1}, "data": 7}"#,
            vec![
                event("STOP", None, 1_795_624_638, 4076),
                event("SHUTDOWN", Some(json!({"guest": false})), -1, -1),
                event("NO_TIMESTAMP", None, -1, -1),
                event("BAD_TIMESTAMP", Some(json!(7)), -1, -1),
            ],
        ),
        (
            "unknown shapes are kept whole",
            br#"{}
{"id": 3}
{"error": {"class": "GenericError"}, "id": 4}
{"error": {"class": 5, "desc": "x"}}
{"error": "text"}
{"return": 1, "error": {"class": "GenericError", "desc": "x"}}
{"event": 5, "timestamp": {"seconds": 1, "microseconds": 2}}
{"x-new-kind": true}"#,
            vec![
                unknown(json!({})),
                unknown(json!({"id": 3})),
                unknown(json!({"error": {"class": "GenericError"}, "id": 4})),
                unknown(json!({"error": {"class": 5, "desc": "x"}})),
                unknown(json!({"error": "text"})),
                unknown(json!({"return": 1, "error": {"class": "GenericError", "desc": "x"}})),
                unknown(json!({"event": 5, "timestamp": {"seconds": 1, "microseconds": 2}})),
                unknown(json!({"x-new-kind": true})),
            ],
        ),
    ];
    check(&table);
}

#[test]
fn id_and_reply_accessors() {
    let messages: Vec<ServerMessage> = decode(
        br#"{"return": {}, "id": 1}{"error": {"class": "GenericError", "desc": "x"}, "id": "e"}{"id": 9}{"event": "STOP"}{"QMP": {}}{"x": 1}"#,
    )
    .into_iter()
    .map(|o| match o {
        Outcome::Message(m) => m,
        other => panic!("unexpected {other:?}"),
    })
    .collect();
    let ids: Vec<Option<&Value>> = messages.iter().map(ServerMessage::id).collect();
    assert_eq!(
        ids,
        vec![
            Some(&json!(1)),
            Some(&json!("e")),
            Some(&json!(9)),
            None,
            None,
            None
        ]
    );
    let replies: Vec<bool> = messages.iter().map(ServerMessage::is_reply).collect();
    assert_eq!(replies, vec![true, true, true, false, false, false]);
}
