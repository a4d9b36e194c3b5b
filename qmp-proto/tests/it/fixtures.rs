//! The transcripts recorded from QEMU 7.2.22 decode to the expected messages, and the
//! pretty-printed session decodes to the same messages as the compact one.

use qmp_proto::{ErrorClass, ServerMessage, Timestamp};
use serde_json::{json, Value};

use crate::util::{decode, fixture, Outcome};

fn messages(name: &str) -> Vec<ServerMessage> {
    decode(&fixture(name))
        .into_iter()
        .map(|outcome| match outcome {
            Outcome::Message(message) => message,
            other => panic!("{name}: unexpected {other:?}"),
        })
        .collect()
}

/// Each compact line, parsed by serde_json on its own: the reference.
fn reference_lines(name: &str) -> Vec<Value> {
    fixture(name)
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).unwrap())
        .collect()
}

#[test]
fn compact_session_matches_serde_json_line_by_line() {
    for name in ["session.server", "schema.server"] {
        let decoded: Vec<Value> = messages(name).iter().map(ServerMessage::to_value).collect();
        assert_eq!(decoded, reference_lines(name), "{name}");
    }
}

#[test]
fn session_contents() {
    let messages = messages("session.server");
    assert_eq!(messages.len(), 33);
    let ServerMessage::Greeting(greeting) = &messages[0] else {
        panic!("first message is not a greeting: {:?}", messages[0]);
    };
    assert_eq!(greeting.version.qemu.to_string(), "7.2.22");
    assert_eq!(greeting.version.package, "Debian 1:7.2+dfsg-7+deb12u18+b3");
    assert_eq!(greeting.capabilities, ["oob"]);
    let ServerMessage::Error(before_negotiation) = &messages[1] else {
        panic!("expected an error reply: {:?}", messages[1]);
    };
    assert_eq!(before_negotiation.error.class, ErrorClass::CommandNotFound);
    assert_eq!(before_negotiation.id, None);

    let events: Vec<&str> = messages
        .iter()
        .filter_map(|m| match m {
            ServerMessage::Event(e) => Some(e.event.as_str()),
            _ => None,
        })
        .collect();
    for expected in [
        "STOP",
        "RESUME",
        "RESET",
        "POWERDOWN",
        "JOB_STATUS_CHANGE",
        "BLOCK_JOB_COMPLETED",
        "SHUTDOWN",
    ] {
        assert!(
            events.contains(&expected),
            "{expected} missing from {events:?}"
        );
    }
    for message in &messages {
        if let ServerMessage::Event(event) = message {
            assert!(event.timestamp.seconds > 1_700_000_000);
            assert_ne!(event.timestamp, Timestamp::UNAVAILABLE);
        }
    }
    // STOP arrives before the reply to `stop` (id 2).
    let stop = messages
        .iter()
        .position(|m| matches!(m, ServerMessage::Event(e) if e.event == "STOP"))
        .unwrap();
    assert_eq!(messages[stop + 1].id(), Some(&json!(2)));
    // The error replies carry their classes and ids.
    let classes: Vec<(ErrorClass, Option<Value>)> = messages
        .iter()
        .filter_map(|m| match m {
            ServerMessage::Error(e) => Some((e.error.class.clone(), e.id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        classes,
        vec![
            (ErrorClass::CommandNotFound, None),
            (ErrorClass::CommandNotFound, Some(json!(6))),
            (ErrorClass::DeviceNotFound, Some(json!(7))),
            (ErrorClass::GenericError, Some(json!(8))),
        ]
    );
    // The object id comes back intact.
    assert!(messages
        .iter()
        .any(|m| m.id() == Some(&json!({"n": 3, "tag": ["x"]}))));
    let shutdown = messages
        .iter()
        .find_map(|m| match m {
            ServerMessage::Event(e) if e.event == "SHUTDOWN" => Some(e),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        shutdown.data,
        Some(json!({"guest": false, "reason": "host-qmp-quit"}))
    );
}

/// Blanks the timestamps, which differ between the two recordings.
fn without_timestamps(message: &ServerMessage) -> ServerMessage {
    match message {
        ServerMessage::Event(event) => {
            let mut event = event.clone();
            event.timestamp = Timestamp::UNAVAILABLE;
            ServerMessage::Event(event)
        }
        other => other.clone(),
    }
}

#[test]
fn pretty_session_decodes_like_the_compact_one() {
    let compact: Vec<ServerMessage> = messages("session.server")
        .iter()
        .map(without_timestamps)
        .collect();
    let pretty: Vec<ServerMessage> = messages("session-pretty.server")
        .iter()
        .map(without_timestamps)
        .collect();
    // Job events may interleave differently with the blockdev-backup reply between runs:
    // compare as multisets of encoded messages, then the order of everything else.
    let encode = |messages: &[ServerMessage]| {
        let mut lines: Vec<Vec<u8>> = messages
            .iter()
            .map(|m| {
                let mut out = Vec::new();
                m.encode_into(&mut out);
                out
            })
            .collect();
        lines.sort();
        lines
    };
    assert_eq!(encode(&pretty), encode(&compact));
    let not_job = |m: &&ServerMessage| {
        !matches!(m, ServerMessage::Event(e) if e.event.contains("JOB"))
            && m.id() != Some(&json!(11))
    };
    assert!(
        pretty
            .iter()
            .filter(not_job)
            .eq(compact.iter().filter(not_job)),
        "order differs"
    );
}

#[test]
fn schema_reply() {
    let messages = messages("schema.server");
    assert_eq!(messages.len(), 5);
    let ServerMessage::Return(reply) = &messages[2] else {
        panic!("expected the schema reply: {:?}", messages[2]);
    };
    assert_eq!(reply.id, Some(json!(1)));
    let entries = reply.ret.as_array().unwrap();
    assert!(entries.len() > 1000, "{} entries", entries.len());
    assert!(entries
        .iter()
        .any(|e| e["name"] == "query-status" && e["meta-type"] == "command"));
}
