//! Shared helpers: fixture loading, decoding to comparable outcomes, a seeded PRNG.

use std::path::PathBuf;

use qmp_proto::{Decoder, DecoderConfig, Error, ServerMessage};

/// What one decoded message turned into, in a form tests can compare.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Message(ServerMessage),
    Failed { kind: &'static str, raw: Vec<u8> },
}

/// The name of an error variant.
pub fn kind(error: &Error) -> &'static str {
    match error {
        Error::MessageTooLarge { .. } => "MessageTooLarge",
        Error::TooDeep { .. } => "TooDeep",
        Error::InvalidUtf8 { .. } => "InvalidUtf8",
        Error::NotAnObject { .. } => "NotAnObject",
        Error::Malformed { .. } => "Malformed",
        Error::InvalidCommand { .. } => "InvalidCommand",
        _ => "other",
    }
}

pub fn outcome(result: qmp_proto::Result<ServerMessage>) -> Outcome {
    match result {
        Ok(message) => Outcome::Message(message),
        Err(error) => Outcome::Failed {
            kind: kind(&error),
            raw: error.raw().map(<[u8]>::to_vec).unwrap_or_default(),
        },
    }
}

/// Drains every available message from `decoder`.
pub fn drain(decoder: &mut Decoder, into: &mut Vec<Outcome>) {
    while let Some(result) = decoder.next_message() {
        into.push(outcome(result));
    }
}

/// Decodes `chunks` fed one after the other, pulling messages after each feed.
pub fn decode_chunks<'a>(
    config: DecoderConfig,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Vec<Outcome> {
    let mut decoder = Decoder::with_config(config);
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.feed(chunk);
        drain(&mut decoder, &mut out);
    }
    out
}

/// Decodes `bytes` fed in one chunk, with the default limits.
pub fn decode(bytes: &[u8]) -> Vec<Outcome> {
    decode_chunks(DecoderConfig::default(), [bytes])
}

/// Decodes `bytes` fed one byte at a time.
pub fn decode_bytewise(config: DecoderConfig, bytes: &[u8]) -> Vec<Outcome> {
    decode_chunks(config, bytes.chunks(1))
}

/// Only the error kinds of `outcomes`, `"ok"` for messages.
pub fn kinds(outcomes: &[Outcome]) -> Vec<&'static str> {
    outcomes
        .iter()
        .map(|o| match o {
            Outcome::Message(_) => "ok",
            Outcome::Failed { kind, .. } => kind,
        })
        .collect()
}

/// The bytes of a recorded transcript.
pub fn fixture(name: &str) -> Vec<u8> {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", name]
        .iter()
        .collect();
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The names of every server-side transcript.
pub const FIXTURES: [&str; 3] = ["session.server", "session-pretty.server", "schema.server"];

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// Splits `bytes` into random chunks of 1 to `max` bytes.
pub fn random_chunks<'a>(rng: &mut Rng, bytes: &'a [u8], max: usize) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let take = 1 + rng.below(max.min(rest.len()));
        let (head, tail) = rest.split_at(take);
        chunks.push(head);
        rest = tail;
    }
    chunks
}
