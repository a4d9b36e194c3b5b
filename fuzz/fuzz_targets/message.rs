//! Fuzz target `message`: one buffer is decoded; every message accepted is classified,
//! encoded and decoded again, and must come back equal.
//!
//! Invariants: no panic; `next_message` gives exactly what classifying each `next_object`
//! with `ServerMessage::from_object` gives (messages and errors alike); `encode -> decode` is
//! the identity on classified server messages and on commands; `to_value` agrees with the encoding; a value always matches itself as an
//! `event_match` pattern.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmp_proto::{event_match, Command, Decoder, ServerMessage};
use serde_json::Value;

fn decode_one(bytes: &[u8]) -> ServerMessage {
    let mut decoder = Decoder::new();
    decoder.feed(bytes);
    let message = match decoder.next_message() {
        Some(Ok(message)) => message,
        other => panic!(
            "re-decoding {:?} gave {other:?}",
            String::from_utf8_lossy(bytes)
        ),
    };
    assert!(
        decoder.next_message().is_none(),
        "one message encoded, several decoded"
    );
    message
}

fuzz_target!(|data: &[u8]| {
    let mut direct = Decoder::new();
    let mut general = Decoder::new();
    direct.feed(data);
    general.feed(data);
    loop {
        let expected = general
            .next_object()
            .map(|item| item.map(ServerMessage::from_object));
        let got = direct.next_message();
        assert_eq!(format!("{got:?}"), format!("{expected:?}"));
        if got.is_none() {
            break;
        }
    }

    let mut decoder = Decoder::new();
    decoder.feed(data);
    while let Some(result) = decoder.next_object() {
        let Ok(object) = result else {
            continue;
        };
        let value = Value::Object(object.clone());
        assert!(event_match(&value, &value));

        if let Ok(command) = Command::from_object(object.clone()) {
            let bytes = command.to_bytes();
            assert!(!bytes.ends_with(b"\n"));
            let mut again = Decoder::new();
            again.feed(&bytes);
            let reread = match again.next_object() {
                Some(Ok(object)) => Command::from_object(object).expect("a command re-reads"),
                other => panic!("re-decoding a command gave {other:?}"),
            };
            let mut expected = command.clone();
            if expected.arguments.as_ref().is_some_and(|a| a.is_empty()) {
                expected.arguments = None;
            }
            assert_eq!(reread, expected);
            assert_eq!(Value::Object(command.to_object()), {
                let mut decoder = Decoder::new();
                decoder.feed(&bytes);
                Value::Object(decoder.next_object().expect("one").expect("valid"))
            });
        }

        let message = ServerMessage::from_object(object);
        let mut bytes = Vec::new();
        message.encode_into(&mut bytes);
        assert!(bytes.ends_with(b"}\r\n"));
        let reread = decode_one(&bytes);
        assert_eq!(reread, message, "encode -> decode changed the message");
        let parsed: Value = serde_json::from_slice(&bytes).expect("the encoder writes JSON");
        assert_eq!(parsed, message.to_value());
    }
});
