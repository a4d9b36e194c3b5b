//! Encoding: commands in the fewest bytes, server messages as QEMU writes them, and round
//! trips through the decoder.

use qmp_proto::{
    Command, Decoder, ErrorClass, ErrorInfo, ErrorReply, Event, Greeting, QemuVersion, ReturnReply,
    ServerMessage, Timestamp, Version,
};
use serde_json::{json, Map, Value};

use crate::util::{fixture, kind};

fn args(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn commands_in_the_fewest_bytes() {
    let table: Vec<(Command, &[u8])> = vec![
        (
            Command::new("query-status"),
            br#"{"execute":"query-status"}"#,
        ),
        (
            Command::new("query-status").with_arguments(Map::new()),
            br#"{"execute":"query-status"}"#,
        ),
        (
            Command::new("query-status").with_id(1),
            br#"{"execute":"query-status","id":1}"#,
        ),
        (
            Command::new("migrate-pause").with_oob(true).with_id(12),
            br#"{"exec-oob":"migrate-pause","id":12}"#,
        ),
        (
            Command::new("blockdev-add")
                .with_arguments(args(json!({"driver": "null-co", "node-name": "a b\"c", "size": 16})))
                .with_id("x"),
            br#"{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"a b\"c","size":16},"id":"x"}"#,
        ),
        (
            Command::new("human-monitor-command")
                .with_arguments(args(json!({"command-line": "info\tversion\n\u{e9}"}))),
            "{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"info\\tversion\\n\u{e9}\"}}".as_bytes(),
        ),
    ];
    for (command, expected) in table {
        let mut out = Vec::new();
        command.encode_into(&mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(expected)
        );
        assert_eq!(command.to_bytes(), expected);
        // No whitespace outside strings, no trailing newline.
        assert!(!out.ends_with(b"\n"));
        // The decoder reads it back as the same command.
        let mut decoder = Decoder::new();
        decoder.feed(&out);
        let object = decoder.next_object().unwrap().unwrap();
        let mut normalised = command.clone();
        if normalised.arguments.as_ref().is_some_and(Map::is_empty) {
            normalised.arguments = None;
        }
        assert_eq!(Command::from_object(object.clone()).unwrap(), normalised);
        assert_eq!(command.to_object(), object);
    }
}

#[test]
fn encoding_appends() {
    let mut out = b"prefix".to_vec();
    Command::new("stop").encode_into(&mut out);
    assert_eq!(out, br#"prefix{"execute":"stop"}"#);
}

#[test]
fn recorded_client_commands_read_back() {
    for name in ["session.client", "schema.client"] {
        let mut decoder = Decoder::new();
        decoder.feed(&fixture(name));
        let mut count = 0;
        while let Some(object) = decoder.next_object() {
            let command = Command::from_object(object.unwrap()).unwrap();
            // Our encoding is never longer than what the recorder sent (compact Python JSON).
            let mut reencoded = Vec::new();
            command.encode_into(&mut reencoded);
            let mut again = Decoder::new();
            again.feed(&reencoded);
            assert_eq!(
                Command::from_object(again.next_object().unwrap().unwrap()).unwrap(),
                command
            );
            count += 1;
        }
        assert!(count >= 3, "{name}: {count} commands");
    }
}

#[test]
fn invalid_commands() {
    let cases = [
        json!({}),
        json!({"execute": 1}),
        json!({"execute": "a", "exec-oob": "b"}),
        json!({"exec-oob": ["x"]}),
        json!({"execute": "a", "arguments": []}),
        json!({"execute": "a", "arguments": null}),
        json!({"execute": "a", "bogus": 1}),
    ];
    for case in cases {
        let error = Command::from_object(args(case.clone())).unwrap_err();
        assert_eq!(kind(&error), "InvalidCommand", "{case}");
        assert!(error.to_string().starts_with("invalid qmp command: "));
    }
    let command =
        Command::from_object(args(json!({"exec-oob": "x", "id": [1], "arguments": {}}))).unwrap();
    assert!(command.oob);
    assert_eq!(command.id, Some(json!([1])));
    assert_eq!(command.arguments, Some(Map::new()));
}

fn server_messages() -> Vec<ServerMessage> {
    vec![
        ServerMessage::Greeting(Greeting {
            version: Version {
                qemu: QemuVersion {
                    major: 7,
                    minor: 2,
                    micro: 22,
                },
                package: "Debian 1:7.2+dfsg-7+deb12u18+b3".into(),
            },
            capabilities: vec!["oob".into()],
        }),
        ServerMessage::Return(ReturnReply {
            ret: json!({}),
            id: None,
        }),
        ServerMessage::Return(ReturnReply {
            ret: json!([{"name": "x\n"}]),
            id: Some(json!({"a": 1})),
        }),
        ServerMessage::Error(ErrorReply {
            error: ErrorInfo {
                class: ErrorClass::CommandNotFound,
                desc: "The command nope has not been found".into(),
            },
            id: Some(json!(3)),
        }),
        ServerMessage::Error(ErrorReply {
            error: ErrorInfo {
                class: ErrorClass::Other("FutureClass".into()),
                desc: "d".into(),
            },
            id: None,
        }),
        ServerMessage::Event(Event {
            event: "SHUTDOWN".into(),
            data: Some(json!({"guest": false, "reason": "host-qmp-quit"})),
            timestamp: Timestamp {
                seconds: 1_795_624_638,
                microseconds: 10125,
            },
        }),
        ServerMessage::Event(Event {
            event: "STOP".into(),
            data: None,
            timestamp: Timestamp::UNAVAILABLE,
        }),
        ServerMessage::Unknown(args(json!({"id": 5, "x-new": [1, 2]}))),
    ]
}

#[test]
fn server_side_encoding_is_compact_crlf_and_round_trips() {
    let mut stream = Vec::new();
    for message in server_messages() {
        let mut out = Vec::new();
        message.encode_into(&mut out);
        assert!(out.ends_with(b"}\r\n"), "{}", String::from_utf8_lossy(&out));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        // The encoding is exactly the compact form of `to_value`.
        let value: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value, message.to_value());
        // And as short as serde_json's compact form (key order aside).
        assert_eq!(
            out.len() - 2,
            serde_json::to_vec(&message.to_value()).unwrap().len()
        );
        stream.extend_from_slice(&out);
    }
    let mut decoder = Decoder::new();
    decoder.feed(&stream);
    let decoded: Vec<ServerMessage> = std::iter::from_fn(|| decoder.next_message())
        .map(Result::unwrap)
        .collect();
    assert_eq!(decoded, server_messages());
}

#[test]
fn the_greeting_encodes_as_qemu_sends_it() {
    let mut out = Vec::new();
    server_messages()[0].encode_into(&mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"QMP\":{\"version\":{\"qemu\":{\"major\":7,\"minor\":2,\"micro\":22},\"package\":\"Debian 1:7.2+dfsg-7+deb12u18+b3\"},\"capabilities\":[\"oob\"]}}\r\n"
    );
}

#[test]
fn fixtures_reencode_to_equal_messages() {
    for name in ["session.server", "session-pretty.server", "schema.server"] {
        let mut decoder = Decoder::new();
        decoder.feed(&fixture(name));
        let messages: Vec<ServerMessage> = std::iter::from_fn(|| decoder.next_message())
            .map(Result::unwrap)
            .collect();
        let mut stream = Vec::new();
        for message in &messages {
            message.encode_into(&mut stream);
        }
        // Compact encoding is never longer than QEMU's own (which has spaces).
        assert!(stream.len() <= fixture(name).len(), "{name}");
        let mut again = Decoder::new();
        again.feed(&stream);
        let reread: Vec<ServerMessage> = std::iter::from_fn(|| again.next_message())
            .map(Result::unwrap)
            .collect();
        assert_eq!(reread, messages, "{name}");
    }
}

#[test]
fn error_class_names() {
    for (class, name) in [
        (ErrorClass::GenericError, "GenericError"),
        (ErrorClass::CommandNotFound, "CommandNotFound"),
        (ErrorClass::DeviceNotActive, "DeviceNotActive"),
        (ErrorClass::DeviceNotFound, "DeviceNotFound"),
        (ErrorClass::KVMMissingCap, "KVMMissingCap"),
        (ErrorClass::Other("X".into()), "X"),
    ] {
        assert_eq!(class.as_str(), name);
        assert_eq!(class.to_string(), name);
        assert_eq!(ErrorClass::from(name), class);
        assert_eq!(ErrorClass::from(name.to_string()), class);
        assert_eq!(serde_json::to_value(&class).unwrap(), json!(name));
        assert_eq!(
            serde_json::from_value::<ErrorClass>(json!(name)).unwrap(),
            class
        );
    }
}
