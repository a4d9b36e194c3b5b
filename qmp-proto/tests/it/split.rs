//! The chunking property (fault catalogue #18): however the input is split, the decoder
//! produces exactly what one single feed produces.

use qmp_proto::DecoderConfig;

use crate::util::{decode, decode_bytewise, decode_chunks, fixture, random_chunks, Rng, FIXTURES};

/// Extra inputs beyond the recorded transcripts: malformed and odd cases whose outcome must
/// not depend on chunking either.
const EXTRA: [&[u8]; 8] = [
    b"{\"return\": tru}\r\n[1,2]\r\n42\r\n\xff\xfe\r\n{\"return\": \"\\ud800\"}\r\n{\"id\": 1}\n",
    b"{\"return\": {\"a\": 1\r\n{\"return\": \"abc\n{\"return\": 2}{\"return\":3}",
    b"{\"return\": \"\\\\\\\"}\\\\\"}\r\n{\"return\": \"\\u00e9\\\\\"}\n",
    b"   \r\n\r\n{\r\n  \"event\": \"X\",\r\n  \"data\": [\r\n    {}\r\n  ]\r\n}\r\n  garbage  \r\n",
    b"{\"return\": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]}\n{\"return\": [[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]}\n",
    // Found by the fuzzer: messages that end (or break) without a line feed at the very end.
    b"{\"return\": {\"seconds\": 1}]",
    b"{\"return\": 1}{\"return\": {\"a\": 2}]{\"a\":1}{\"b\":",
    b"{\"return\": \"0123456789012345678901234567890123456789\"}\r\n{\"return\": \"01234567890123456789012345678901234567890\"}\r\n{\"return\": 1}",
];

/// A config whose limits the extra inputs hit (depth 20, 50 bytes).
fn tight() -> DecoderConfig {
    DecoderConfig::default()
        .with_max_depth(20)
        .with_max_message_size(50)
}

/// Every two-part split of `input` decodes like the whole.
fn check_every_split(config: DecoderConfig, input: &[u8], stride: usize, name: &str) {
    let expected = decode_chunks(config, [input]);
    let mut at = 0;
    while at <= input.len() {
        let (head, tail) = input.split_at(at);
        assert_eq!(
            decode_chunks(config, [head, tail]),
            expected,
            "{name}: split at {at}"
        );
        at += stride;
    }
}

#[test]
fn every_split_point_of_the_small_fixtures() {
    for name in ["session.server", "session-pretty.server"] {
        check_every_split(DecoderConfig::default(), &fixture(name), 1, name);
    }
}

#[test]
fn split_points_of_the_schema_fixture() {
    // 200 KB: every split point would cost 40 GB of decoding (hours in a debug build). Every
    // split in the first and last 512 bytes (greeting, negotiation, the start and end of the
    // big reply, the last event and reply) and 128 evenly spaced ones inside the big reply;
    // one-byte feeding below puts a boundary at every byte at once, and the fuzz target
    // covers arbitrary chunkings.
    let input = fixture("schema.server");
    let expected = decode(&input);
    let len = input.len();
    let step = (len - 1024) / 128;
    let points = (0..512)
        .chain((512..len - 512).step_by(step))
        .chain(len - 512..=len);
    for at in points {
        let (head, tail) = input.split_at(at);
        assert_eq!(
            decode_chunks(DecoderConfig::default(), [head, tail]),
            expected,
            "split at {at}"
        );
    }
}

#[test]
fn every_split_point_of_the_extra_inputs() {
    for (index, input) in EXTRA.iter().enumerate() {
        for config in [DecoderConfig::default(), tight()] {
            check_every_split(config, input, 1, &format!("extra #{index}"));
            // Every three-part split too: a boundary inside CRLF, an escape, a UTF-8 sequence
            // and right after a line feed, all at once.
            let expected = decode_chunks(config, [&input[..]]);
            for first in 0..=input.len() {
                for second in first..=input.len() {
                    let parts = [&input[..first], &input[first..second], &input[second..]];
                    assert_eq!(
                        decode_chunks(config, parts),
                        expected,
                        "extra #{index}: split at {first} and {second}"
                    );
                }
            }
        }
    }
}

#[test]
fn one_byte_feeding_matches_a_single_feed() {
    for name in FIXTURES {
        let input = fixture(name);
        assert_eq!(
            decode_bytewise(DecoderConfig::default(), &input),
            decode(&input),
            "{name}"
        );
    }
    for input in EXTRA {
        for config in [DecoderConfig::default(), tight()] {
            assert_eq!(
                decode_bytewise(config, input),
                decode_chunks(config, [input])
            );
        }
    }
}

#[test]
fn random_chunkings_match_a_single_feed() {
    let mut rng = Rng::new(0x5eed_1234);
    let mut all = Vec::new();
    for name in FIXTURES {
        all.extend_from_slice(&fixture(name));
    }
    for input in EXTRA {
        all.extend_from_slice(input);
    }
    for config in [DecoderConfig::default(), tight()] {
        let expected = decode_chunks(config, [&all[..]]);
        for round in 0..200 {
            let max = [2, 7, 64, 1500, 65536][round % 5];
            let chunks = random_chunks(&mut rng, &all, max);
            assert_eq!(decode_chunks(config, chunks), expected, "round {round}");
        }
    }
}

#[test]
fn a_thousand_messages_in_one_chunk() {
    let session = fixture("session.server");
    let mut stream = Vec::new();
    while stream.len() < 1000 * 120 {
        stream.extend_from_slice(&session);
    }
    let one_session = decode(&session);
    assert_eq!(one_session.len(), 33);
    let copies = stream.len() / session.len();
    let outcomes = decode(&stream);
    assert_eq!(outcomes.len(), 33 * copies);
    assert!(outcomes.len() >= 1000);
    for (index, outcome) in outcomes.iter().enumerate() {
        assert_eq!(outcome, &one_session[index % 33], "message {index}");
    }
    // And 1000 small messages, in one chunk, pulled only after the last feed.
    let mut small = Vec::new();
    for id in 0..1000 {
        small.extend_from_slice(format!("{{\"return\": {{}}, \"id\": {id}}}\r\n").as_bytes());
    }
    let outcomes = decode(&small);
    assert_eq!(outcomes.len(), 1000);
}

#[test]
fn the_first_limit_crossed_is_the_one_reported() {
    // Found by the fuzzer: depth and size limits crossed by the same message must give the
    // same error however it is chunked: the one whose limit comes first in the bytes.
    let config = tight();
    let deep_late = [
        &b"{\"padding\": \"0123456789012345678901234567890123456789\", "[..],
        &b"\"a\":[".repeat(25),
        &b"]".repeat(25),
        b"}\n",
    ]
    .concat();
    let deep_early = [
        &b"{\"a\":"[..],
        &b"[".repeat(25),
        &b"]".repeat(25),
        b", \"padding\": \"0123456789012345678901234567890123456789\"}\n",
    ]
    .concat();
    for (input, expected) in [(deep_late, "MessageTooLarge"), (deep_early, "TooDeep")] {
        let mut stream = input.clone();
        stream.extend_from_slice(b"{\"return\": 1}\n");
        let whole = decode_chunks(config, [&stream[..]]);
        assert_eq!(crate::util::kinds(&whole), [expected, "ok"]);
        assert_eq!(decode_bytewise(config, &stream), whole);
        check_every_split(config, &stream, 1, expected);
    }
}

#[test]
fn pulling_one_message_per_feed_gives_the_same_outcome() {
    // A caller that does not drain the decoder after every feed: errors detected mid-buffer
    // (too deep, too large) must not let later input overtake what is still buffered.
    let mut stream = Vec::new();
    for input in EXTRA {
        stream.extend_from_slice(input);
        stream.extend_from_slice(b"\n");
    }
    stream.extend_from_slice(&fixture("session.server"));
    for config in [DecoderConfig::default(), tight()] {
        let expected = decode_chunks(config, [&stream[..]]);
        for chunk in [1, 7, 64, 4096] {
            let mut decoder = qmp_proto::Decoder::with_config(config);
            let mut out = Vec::new();
            for piece in stream.chunks(chunk) {
                decoder.feed(piece);
                if let Some(result) = decoder.next_message() {
                    out.push(result);
                }
            }
            let mut rest = Vec::new();
            crate::util::drain(&mut decoder, &mut rest);
            let got: Vec<crate::util::Outcome> = out
                .into_iter()
                .map(crate::util::outcome)
                .chain(rest)
                .collect();
            assert_eq!(got, expected, "chunk {chunk}");
        }
    }
}
