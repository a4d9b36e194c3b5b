//! The malformed-input cases of the fault catalogue, section B (#12, #13, #16-#23), at the
//! decoder level: each yields a typed outcome, no panic, and decoding resumes afterwards.

use qmp_proto::{Decoder, Error, ReturnReply, ServerMessage};
use serde_json::{json, Value};

use crate::util::{decode, decode_bytewise, kinds, Outcome};

/// Decodes `input` in one feed and byte by byte, checks both agree, returns the kinds.
fn kinds_of(input: &[u8]) -> Vec<&'static str> {
    let whole = decode(input);
    assert_eq!(
        whole,
        decode_bytewise(Default::default(), input),
        "chunking changed the outcome of {:?}",
        String::from_utf8_lossy(input)
    );
    kinds(&whole)
}

fn single_return(input: &[u8]) -> Value {
    match decode(input).as_slice() {
        [Outcome::Message(ServerMessage::Return(ReturnReply { ret, .. }))] => ret.clone(),
        other => panic!("expected one return from {input:?}, got {other:?}"),
    }
}

/// #12: malformed JSON mid-session is a typed error and the next line still decodes.
#[test]
fn b12_malformed_json_mid_session() {
    let cases: [&[u8]; 7] = [
        b"{\"return\": {}}\r\n{\"return\": tru}\r\n{\"return\": 1}\r\n",
        b"{\"return\": {}}\r\n{\"return\" {}}\r\n{\"return\": 1}\r\n",
        b"{\"return\": {}}\r\n{'return': 1}\r\n{\"return\": 1}\r\n",
        b"{\"return\": {}}\r\n{\"return\": [1,}\r\n{\"return\": 1}\r\n",
        b"{\"return\": {}}\r\n{\"return\": 1,}\r\n{\"return\": 1}\r\n",
        b"{\"return\": {}}\r\n{\"return\": [}\r\n{\"return\": 1}\r\n",
        b"{\"return\": {}}\r\ngarbage here\r\n{\"return\": 1}\r\n",
    ];
    for input in cases {
        assert_eq!(kinds_of(input), ["ok", "Malformed", "ok"], "{input:?}");
    }
    // The error keeps the offending bytes.
    let outcomes = decode(b"{\"return\": tru}\r\n");
    assert_eq!(
        outcomes,
        [Outcome::Failed {
            kind: "Malformed",
            raw: b"{\"return\": tru}".to_vec()
        }]
    );
    let mut decoder = Decoder::new();
    decoder.feed(b"{\"return\": tru}\r\n");
    match decoder.next_message() {
        Some(Err(error @ Error::Malformed { .. })) => {
            assert!(std::error::Error::source(&error).is_some());
            // The message says what the parser found wrong, by itself.
            let text = error.to_string();
            assert!(text.starts_with("malformed json message: "), "{text}");
            assert!(text.contains("line 1 column"), "{text}");
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
}

/// #13: valid JSON that is not an object.
#[test]
fn b13_not_an_object() {
    for input in [
        &b"[]"[..],
        b"null",
        b"42",
        b"\"x\"",
        b"true",
        b"[1, {\"a\": 2}]",
        b"-1.5e3",
    ] {
        let mut line = input.to_vec();
        line.extend_from_slice(b"\r\n{\"return\": 1}\r\n");
        assert_eq!(kinds_of(&line), ["NotAnObject", "ok"], "{input:?}");
        assert_eq!(
            decode(&line)[0],
            Outcome::Failed {
                kind: "NotAnObject",
                raw: input.to_vec()
            }
        );
    }
}

/// #16: malformed replies are kept as `Unknown` with their id, so the client can fail that
/// one command; they are not decoding errors.
#[test]
fn b16_malformed_reply_keeps_its_id() {
    let input = br#"{"id": 5}
{"error": {"desc": "no class"}, "id": 6}
{"error": {"class": "GenericError"}, "id": 7}
{"error": {"class": "GenericError", "desc": 1}, "id": 8}
{"error": [], "id": 9}
{"return": 1, "id": 10}
"#;
    let outcomes = decode(input);
    let ids: Vec<(bool, Value)> = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Message(m) => (
                matches!(m, ServerMessage::Unknown(_)),
                m.id().cloned().unwrap_or(Value::Null),
            ),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        ids,
        vec![
            (true, json!(5)),
            (true, json!(6)),
            (true, json!(7)),
            (true, json!(8)),
            (true, json!(9)),
            (false, json!(10)),
        ]
    );
}

/// #17: EOF mid-message: nothing is produced, and the partial size is known.
#[test]
fn b17_partial_message() {
    let mut decoder = Decoder::new();
    decoder.feed(b"{\"return\": {}}\r\n{\"return\": {\"a\"");
    assert!(matches!(decoder.next_message(), Some(Ok(_))));
    assert!(decoder.next_message().is_none());
    assert_eq!(decoder.buffered_len(), 15);
    assert!(decoder.in_message());
    decoder.feed(b": 1}}\r\n");
    assert!(matches!(decoder.next_message(), Some(Ok(_))));
    assert_eq!(decoder.buffered_len(), 0);
    assert!(!decoder.in_message());
}

/// #17 and #12: a message cut short and followed by a new one on the next line: the cut
/// message is an error and the next one decodes.
#[test]
fn b17_truncated_then_resync_at_next_line() {
    let cases: [&[u8]; 4] = [
        // Cut between tokens; the next line starts a new message.
        b"{\"return\": {\"a\": 1\r\n{\"return\": 2}\r\n",
        // Cut inside a string: JSON strings cannot hold a raw line feed.
        b"{\"return\": \"abc\r\n{\"return\": 2}\r\n",
        // Cut right after the opening brace.
        b"{\n{\"return\": 2}\n",
        // Cut in a pretty-printed message.
        b"{\r\n    \"return\": {\r\n        \"a\": 1\r\n{\r\n    \"return\": 2\r\n}\r\n",
    ];
    for input in cases {
        let outcomes = decode(input);
        assert_eq!(kinds_of(input), ["Malformed", "ok"], "{input:?}");
        assert_eq!(
            outcomes[1],
            Outcome::Message(ServerMessage::Return(ReturnReply {
                ret: json!(2),
                id: None
            }))
        );
    }
    // A raw line feed in a string: the rest of the string's line is garbage of its own.
    assert_eq!(
        kinds_of(b"{\"return\": \"abc\n\"def\"}\n{\"return\": 2}\n"),
        ["Malformed", "Malformed", "ok"]
    );
}

/// #22: bad bytes from the server.
#[test]
fn b22_bad_bytes() {
    let cases: [(&[u8], &str); 8] = [
        (b"{\"return\": \"\xff\"}\r\n", "InvalidUtf8"),
        (b"\xff\r\n", "InvalidUtf8"),
        (b"{\"return\": \"\xc0\xaf\"}\r\n", "InvalidUtf8"),
        (b"{\"return\": \"\xed\xa0\x80\"}\r\n", "InvalidUtf8"),
        (b"{\"return\": \"\xe2\x82\"}\r\n", "InvalidUtf8"),
        (b"{\"return\": \"\\ud800\"}\r\n", "Malformed"),
        (b"{\"return\": \"a\0b\"}\r\n", "Malformed"),
        (b"{\"return\": \"a\x01b\"}\r\n", "Malformed"),
    ];
    for (input, expected) in cases {
        let mut stream = input.to_vec();
        stream.extend_from_slice(b"{\"return\": 1}\r\n");
        assert_eq!(kinds_of(&stream), [expected, "ok"], "{input:?}");
        assert_eq!(
            decode(&stream)[0],
            Outcome::Failed {
                kind: expected,
                raw: input[..input.len() - 2].to_vec()
            }
        );
    }
    // An escaped NUL is valid JSON and is accepted.
    assert_eq!(single_return(b"{\"return\": \"a\\u0000b\"}"), json!("a\0b"));
    // A raw 0xFF between messages (QEMU's resync byte) costs only its own line.
    assert_eq!(
        kinds_of(b"{\"return\": 1}\r\n\xff\xff\xff\r\n{\"return\": 2}\r\n"),
        ["ok", "InvalidUtf8", "ok"]
    );
}

/// #23: odd values, with the documented policies.
#[test]
fn b23_odd_values() {
    // Duplicate keys: the last occurrence wins.
    assert_eq!(single_return(br#"{"return": 1, "return": 2}"#), json!(2));
    assert_eq!(
        single_return(br#"{"return": {"a": 1, "b": 2, "a": 3}}"#),
        json!({"a": 3, "b": 2})
    );
    // Integers: exact within u64 and i64.
    assert_eq!(
        single_return(br#"{"return": 18446744073709551615}"#),
        json!(u64::MAX)
    );
    assert_eq!(
        single_return(br#"{"return": -9223372036854775808}"#),
        json!(i64::MIN)
    );
    // Beyond u64: the nearest f64.
    let big = single_return(br#"{"return": 18446744073709551616}"#);
    assert_eq!(big.as_u64(), None);
    assert_eq!(big.as_f64(), Some(18_446_744_073_709_551_616.0));
    let long = single_return(b"{\"return\": 123456789012345678901234567890}");
    assert_eq!(long.as_f64(), Some(1.2345678901234568e29));
    // Beyond f64: a typed error, no panic.
    assert_eq!(
        kinds_of(b"{\"return\": 1e400}\r\n{\"return\": 1}\r\n"),
        ["Malformed", "ok"]
    );
    assert_eq!(
        kinds_of(b"{\"return\": -1e400}\r\n{\"return\": 1}\r\n"),
        ["Malformed", "ok"]
    );
    // Tiny floats underflow to zero.
    assert_eq!(single_return(br#"{"return": 1e-400}"#).as_f64(), Some(0.0));
    // -0 and -0.0 keep their sign as floats.
    for input in [&br#"{"return": -0}"#[..], br#"{"return": -0.0}"#] {
        let zero = single_return(input).as_f64().unwrap();
        assert_eq!(zero, 0.0);
        assert!(zero.is_sign_negative(), "{input:?}");
    }
    // An id keeps its exact JSON type: 1 and "1" are different ids.
    let ids: Vec<Option<Value>> = decode(br#"{"return": {}, "id": 1}{"return": {}, "id": "1"}"#)
        .into_iter()
        .map(|o| match o {
            Outcome::Message(m) => m.id().cloned(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(ids, vec![Some(json!(1)), Some(json!("1"))]);
    assert_ne!(json!(1), json!("1"));
}

/// Found by the fuzzer: floats must survive encode -> decode exactly.
#[test]
fn floats_round_trip_exactly() {
    for text in [
        "1.8446744077440737e24",
        "1e300",
        "0.1",
        "5e-324",
        "1.7976931348623157e308",
    ] {
        let input = format!("{{\"return\": {text}}}");
        let value = single_return(input.as_bytes());
        let mut out = Vec::new();
        ServerMessage::Return(ReturnReply {
            ret: value.clone(),
            id: None,
        })
        .encode_into(&mut out);
        assert_eq!(single_return(&out), value, "{text}");
        assert_eq!(value.as_f64(), text.parse::<f64>().ok(), "{text}");
    }
}
