//! Limits: the message size cap (exactly the cap parses, one byte more does not, memory stays
//! bounded) and the nesting depth (1024 parses, 1025 does not, no stack overflow).

use std::time::{Duration, Instant};

use crate::util::{decode_chunks, kinds, Outcome};
use qmp_proto::{Decoder, DecoderConfig, ServerMessage};

const MIB: usize = 1024 * 1024;
const CAP: usize = DecoderConfig::DEFAULT_MAX_MESSAGE_SIZE;

/// `{"return":"xxx..."}` of exactly `len` bytes.
fn message_of_len(len: usize) -> Vec<u8> {
    let overhead = br#"{"return":""}"#.len();
    let mut out = br#"{"return":""#.to_vec();
    out.resize(len - 2, b'x');
    out.extend_from_slice(b"\"}");
    assert_eq!(out.len(), len);
    assert!(len > overhead);
    out
}

/// Feeds `stream` in `chunk`-byte pieces, pulling after each, and checks the buffer never
/// holds more than `cap + chunk` bytes.
fn feed_bounded(config: DecoderConfig, stream: &[u8], chunk: usize) -> Vec<&'static str> {
    let mut decoder = Decoder::with_config(config);
    let mut out = Vec::new();
    let bound = config.max_message_size + chunk;
    for piece in stream.chunks(chunk) {
        decoder.feed(piece);
        assert!(
            decoder.buffer_capacity() <= bound.max(16 * 1024),
            "buffer grew to {} bytes, bound {bound}",
            decoder.buffer_capacity()
        );
        while let Some(result) = decoder.next_message() {
            out.push(match result {
                Ok(_) => "ok",
                Err(e) => crate::util::kind(&e),
            });
        }
    }
    out
}

#[test]
fn exactly_the_cap_parses_and_one_more_byte_is_too_large() {
    for chunk in [64 * 1024, 1_000_003] {
        for (len, expected) in [(CAP - 1, "ok"), (CAP, "ok"), (CAP + 1, "MessageTooLarge")] {
            let mut stream = message_of_len(len);
            stream.extend_from_slice(b"\r\n{\"return\": 1}\r\n");
            assert_eq!(
                feed_bounded(DecoderConfig::default(), &stream, chunk),
                [expected, "ok"],
                "len {len}, chunk {chunk}"
            );
        }
    }
    // In a single feed too; the error carries the start of the message.
    let mut stream = message_of_len(CAP + 1);
    stream.extend_from_slice(b"\r\n{\"return\": 1}\r\n");
    let outcomes = decode_chunks(DecoderConfig::default(), [&stream[..]]);
    assert_eq!(kinds(&outcomes), ["MessageTooLarge", "ok"]);
    match &outcomes[0] {
        Outcome::Failed { raw, .. } => {
            assert_eq!(raw.len(), qmp_proto::MAX_RAW_LEN);
            assert!(raw.starts_with(br#"{"return":"xxx"#));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn too_large_is_reported_before_the_message_ends() {
    let config = DecoderConfig::default().with_max_message_size(1000);
    let mut decoder = Decoder::with_config(config);
    decoder.feed(&message_of_len(5000)[..1001]);
    match decoder.next_message() {
        Some(Err(qmp_proto::Error::MessageTooLarge { limit, .. })) => assert_eq!(limit, 1000),
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    assert_eq!(decoder.buffered_len(), 0);
    assert!(decoder.in_message());
    // The rest of the oversized message is discarded as it arrives.
    decoder.feed(&message_of_len(5000)[1001..]);
    assert!(decoder.next_message().is_none());
    assert_eq!(decoder.buffered_len(), 0);
    decoder.feed(b"\r\n{\"return\": 1}\r\n");
    assert!(matches!(
        decoder.next_message(),
        Some(Ok(ServerMessage::Return(_)))
    ));
    assert!(decoder.next_message().is_none());
}

#[test]
fn endless_line_without_newline_stays_bounded() {
    // Slowloris: garbage, or an unterminated string, that never ends.
    let config = DecoderConfig::default().with_max_message_size(64 * 1024);
    for prefix in [&b"garbage"[..], b"{\"return\": \"", b"{\"return\": [1,"] {
        let mut decoder = Decoder::with_config(config);
        decoder.feed(prefix);
        let filler: &[u8] = if prefix.ends_with(b",") {
            b"1,1,1,1,"
        } else {
            b"abcdefgh"
        };
        let mut errors = 0;
        for _ in 0..200_000 {
            decoder.feed(filler);
            assert!(decoder.buffer_capacity() <= 64 * 1024 + 8 * 1024);
            while let Some(result) = decoder.next_message() {
                assert!(matches!(
                    result,
                    Err(qmp_proto::Error::MessageTooLarge { .. })
                ));
                errors += 1;
            }
        }
        assert_eq!(errors, 1, "one error per oversized message");
    }
}

#[test]
fn large_buffer_is_given_back() {
    let mut decoder = Decoder::new();
    decoder.feed(&message_of_len(4 * MIB));
    assert!(matches!(decoder.next_message(), Some(Ok(_))));
    decoder.feed(b"{\"return\": 1}");
    assert!(decoder.buffer_capacity() < MIB);
    assert!(matches!(decoder.next_message(), Some(Ok(_))));
}

#[test]
fn one_byte_feeding_is_linear() {
    // A quadratic decoder would take hours here; a linear one takes about a second even
    // unoptimised.
    let message = message_of_len(2 * MIB);
    let started = Instant::now();
    let mut decoder = Decoder::new();
    for byte in message.chunks(1) {
        decoder.feed(byte);
    }
    assert!(matches!(decoder.next_message(), Some(Ok(_))));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

/// `{"return":{"a":{"a":...{}...}}}` with `depth` levels in all.
fn nested_objects(depth: usize) -> Vec<u8> {
    let mut out = b"{\"return\":".to_vec();
    for _ in 2..depth {
        out.extend_from_slice(b"{\"a\":");
    }
    out.extend_from_slice(b"{}");
    out.resize(out.len() + depth - 2, b'}');
    out.push(b'}');
    out
}

/// `{"return":[[[...]]]}` with `depth` levels in all.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut out = b"{\"return\":".to_vec();
    out.resize(out.len() + depth - 1, b'[');
    out.resize(out.len() + depth - 1, b']');
    out.push(b'}');
    out
}

/// Runs `f` on a thread with a 2 MiB stack, as Rust gives spawned threads by default.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(2 * MIB)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

#[test]
fn depth_128_and_1024_parse_1025_is_too_deep() {
    let results = on_small_stack(|| {
        let mut results = Vec::new();
        for build in [nested_objects as fn(usize) -> Vec<u8>, nested_arrays] {
            for depth in [1 + 1, 128, 129, 1023, 1024, 1025, 100_000] {
                let mut stream = build(depth);
                stream.extend_from_slice(b"\r\n{\"return\": 1}\r\n");
                let mut decoder = Decoder::new();
                decoder.feed(&stream);
                let mut kinds = Vec::new();
                while let Some(result) = decoder.next_message() {
                    // Dropping a deep value recurses too: it happens here, on the small stack.
                    kinds.push(match result {
                        Ok(_) => "ok",
                        Err(e) => crate::util::kind(&e),
                    });
                }
                results.push((depth, kinds));
            }
        }
        results
    });
    for (depth, kinds) in results {
        let expected = if depth <= 1024 {
            ["ok", "ok"]
        } else {
            ["TooDeep", "ok"]
        };
        assert_eq!(kinds, expected, "depth {depth}");
    }
}

#[test]
fn deep_message_survives_byte_feeding_and_a_lower_limit() {
    let config = DecoderConfig::default().with_max_depth(128);
    let mut stream = nested_arrays(129);
    stream.extend_from_slice(b"\n");
    stream.extend_from_slice(&nested_arrays(128));
    let outcomes = on_small_stack(move || {
        let bytewise = kinds(&crate::util::decode_bytewise(config, &stream)).to_vec();
        let whole = kinds(&decode_chunks(config, [&stream[..]])).to_vec();
        (bytewise, whole)
    });
    assert_eq!(outcomes.0, ["TooDeep", "ok"]);
    assert_eq!(outcomes.1, ["TooDeep", "ok"]);
    let mut decoder = Decoder::with_config(config);
    decoder.feed(&nested_arrays(200));
    match decoder.next_message() {
        Some(Err(qmp_proto::Error::TooDeep { limit })) => assert_eq!(limit, 128),
        other => panic!("expected TooDeep, got {other:?}"),
    }
}

#[test]
fn depth_limit_is_clamped() {
    assert_eq!(
        Decoder::with_config(DecoderConfig::default().with_max_depth(5000))
            .config()
            .max_depth,
        1024
    );
    assert_eq!(
        Decoder::with_config(DecoderConfig::default().with_max_depth(0))
            .config()
            .max_depth,
        1
    );
    let mut decoder = Decoder::with_config(DecoderConfig::default().with_max_depth(1));
    decoder.feed(b"{\"return\": 1}{\"return\": {}}");
    assert!(matches!(decoder.next_message(), Some(Ok(_))));
    assert!(matches!(
        decoder.next_message(),
        Some(Err(qmp_proto::Error::TooDeep { limit: 1 }))
    ));
}

#[test]
fn debug_output_is_a_summary() {
    let mut decoder = Decoder::new();
    decoder.feed(&message_of_len(100_000)[..90_000]);
    assert!(decoder.next_message().is_none());
    let text = format!("{decoder:?}");
    assert!(text.len() < 300, "{text}");
    assert!(text.contains("buffered_len: 90000"), "{text}");
}
