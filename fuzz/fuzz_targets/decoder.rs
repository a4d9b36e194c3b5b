//! Fuzz target `decoder`: arbitrary bytes fed in arbitrary chunks.
//!
//! Invariants: no panic; the outcome (every message and every error, with its bytes) is the
//! same as with a single feed, with random chunks pulled after each feed or only one message
//! per feed, and (for inputs up to 2 KiB) with one-byte feeding; the buffer never holds more than
//! the message limit plus the largest chunk fed (while messages are pulled between feeds).
//!
//! Input layout: byte 0 picks the limits (default, or small ones that the input can hit),
//! bytes 1-2 seed the chunk sizes, the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmp_proto::{Decoder, DecoderConfig, Error};
use serde_json::{Map, Value};

#[derive(Debug, PartialEq)]
enum Outcome {
    Object(Map<String, Value>),
    Failed(&'static str, Vec<u8>),
}

fn outcome(result: qmp_proto::Result<Map<String, Value>>) -> Outcome {
    match result {
        Ok(object) => Outcome::Object(object),
        Err(error) => {
            let kind = match &error {
                Error::MessageTooLarge { .. } => "MessageTooLarge",
                Error::TooDeep { .. } => "TooDeep",
                Error::InvalidUtf8 { .. } => "InvalidUtf8",
                Error::NotAnObject { .. } => "NotAnObject",
                Error::Malformed { .. } => "Malformed",
                _ => "other",
            };
            Outcome::Failed(kind, error.raw().map(<[u8]>::to_vec).unwrap_or_default())
        }
    }
}

/// Feeds `chunks`, pulling everything after each, checking the memory bound.
fn run<'a>(config: DecoderConfig, chunks: impl Iterator<Item = &'a [u8]>) -> Vec<Outcome> {
    let mut decoder = Decoder::with_config(config);
    let mut out = Vec::new();
    let mut largest = 0;
    for chunk in chunks {
        largest = largest.max(chunk.len());
        decoder.feed(chunk);
        let bound = (config.max_message_size + largest).max(8 * 1024);
        assert!(
            decoder.buffer_capacity() <= bound,
            "buffer of {} bytes, bound {bound}",
            decoder.buffer_capacity()
        );
        while let Some(result) = decoder.next_object() {
            out.push(outcome(result));
        }
        assert!(decoder.buffered_len() <= config.max_message_size);
    }
    out
}

/// Feeds `chunks`, pulling at most one message after each feed, then drains the rest.
fn run_pulling_one<'a>(
    config: DecoderConfig,
    chunks: impl Iterator<Item = &'a [u8]>,
) -> Vec<Outcome> {
    let mut decoder = Decoder::with_config(config);
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.feed(chunk);
        if let Some(result) = decoder.next_object() {
            out.push(outcome(result));
        }
    }
    while let Some(result) = decoder.next_object() {
        out.push(outcome(result));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&[mode, seed_low, seed_high], stream)) = data.split_first_chunk::<3>() else {
        return;
    };
    let config = if mode & 1 == 0 {
        DecoderConfig::default()
    } else {
        DecoderConfig::default()
            .with_max_message_size(1 + usize::from(mode >> 1) * 4)
            .with_max_depth(1 + usize::from(mode >> 4) * 10)
    };
    let mut state = u64::from(u16::from_le_bytes([seed_low, seed_high])) | 1 << 32;
    let max_chunk = 1 + usize::from(seed_high % 64);
    let mut chunks = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let take = (1 + (state % max_chunk as u64) as usize).min(rest.len());
        let (head, tail) = rest.split_at(take);
        chunks.push(head);
        rest = tail;
    }

    let whole = run(config, std::iter::once(stream));
    let lazy = run_pulling_one(config, chunks.iter().copied());
    let chunked = run(config, chunks.into_iter());
    assert_eq!(whole, chunked, "chunking changed the outcome");
    assert_eq!(
        whole, lazy,
        "pulling one message per feed changed the outcome"
    );
    // One-byte feeding is the slowest run; keep it for inputs small enough to stay fast.
    if stream.len() <= 2048 {
        let bytewise = run(config, stream.chunks(1));
        assert_eq!(whole, bytewise, "one-byte feeding changed the outcome");
    }
});
