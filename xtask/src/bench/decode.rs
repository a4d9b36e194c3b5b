//! Decoder throughput on every recorded QEMU transcript, beside `serde_json::from_slice::<Value>`
//! on the same messages in the same rounds (target: at least 1.0x on each corpus).
//!
//! The decoder is fed 64 KiB chunks, as qmp-client's reader does, and every message is pulled
//! and classified (`next_message`); the baseline parses each message's bytes, already cut out,
//! into a `Value`. Throughput is counted on this thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`),
//! because the work is pure computation and the machine is shared; CPU per message stands
//! beside it.

use std::hint::black_box;

use qmp_proto::Decoder;
use serde_json::Value;

use super::{measure, Cpu, Figure, Settings, Target};

/// The corpora: id, name, fixture files (concatenated).
const CORPORA: [(&str, &str, &[&str]); 4] = [
    (
        "decode/all",
        "decoder: all transcripts",
        &["session.server", "session-pretty.server", "schema.server"],
    ),
    (
        "decode/compact",
        "decoder: session, compact",
        &["session.server"],
    ),
    (
        "decode/pretty",
        "decoder: session, pretty=on",
        &["session-pretty.server"],
    ),
    (
        "decode/schema",
        "decoder: query-qmp-schema",
        &["schema.server"],
    ),
];

/// Bytes fed per `feed` call (qmp-client reads 64 KiB at a time).
const CHUNK: usize = 64 * 1024;

/// Measures every corpus `settings` selects.
pub fn run(settings: &Settings) -> Result<Vec<Figure>, String> {
    let (target_bytes, rounds) = settings.pick((4 << 20, 21), (256 << 10, 3));
    let mut figures = Vec::new();
    for (id, name, files) in CORPORA {
        if !settings.wants(id, name) {
            continue;
        }
        let stream = corpus(files, target_bytes)?;
        let ranges = message_ranges(&stream)?;
        let count = decoder_pass(&stream)?;
        if count != ranges.len() {
            return Err(format!(
                "{name}: the decoder found {count} messages, serde_json {}",
                ranges.len()
            ));
        }
        let mut figure = Figure::new(
            id,
            name,
            "MB/s",
            "Decoder::next_message",
            "serde_json::from_slice::<Value>",
            Target::RatioAtLeast(1.0),
        );
        let mb = stream.len() as f64 / 1e6;
        // Warm-up, then rounds alternating which side goes first.
        serde_pass(&stream, &ranges)?;
        for round in 0..rounds {
            for side in [round % 2, 1 - round % 2] {
                let (result, _, cpu) = if side == 0 {
                    measure(Cpu::thread, || decoder_pass(black_box(&stream)))
                } else {
                    measure(Cpu::thread, || serde_pass(black_box(&stream), &ranges))
                };
                result?;
                let seconds = cpu.total.as_secs_f64().max(1e-9);
                let target = if side == 0 {
                    &mut figure.ours
                } else {
                    &mut figure.baseline
                };
                target.push(mb / seconds, cpu, ranges.len());
            }
        }
        figure.notes.push(format!(
            "{mb:.1} MB, {} messages per round, {rounds} rounds; MB/s of thread CPU time, CPU per message",
            ranges.len()
        ));
        figures.push(figure);
    }
    Ok(figures)
}

/// The fixtures concatenated, repeated to at least `target_bytes`.
fn corpus(files: &[&str], target_bytes: usize) -> Result<Vec<u8>, String> {
    let dir = crate::workspace_root().join("qmp-proto/tests/fixtures");
    let mut unit = Vec::new();
    for name in files {
        let path = dir.join(name);
        let bytes =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        unit.extend_from_slice(&bytes);
    }
    let mut stream = Vec::with_capacity(target_bytes + unit.len());
    while stream.len() < target_bytes {
        stream.extend_from_slice(&unit);
    }
    Ok(stream)
}

/// The byte ranges of the messages in `stream`, found once with serde_json.
fn message_ranges(stream: &[u8]) -> Result<Vec<(usize, usize)>, String> {
    let mut ranges = Vec::new();
    let mut values =
        serde_json::Deserializer::from_slice(stream).into_iter::<serde::de::IgnoredAny>();
    let mut start = 0;
    while let Some(item) = values.next() {
        item.map_err(|e| format!("fixture is not JSON: {e}"))?;
        let end = values.byte_offset();
        let skip = stream[start..end]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
        ranges.push((start + skip, end));
        start = end;
    }
    Ok(ranges)
}

fn decoder_pass(stream: &[u8]) -> Result<usize, String> {
    let mut decoder = Decoder::new();
    let mut count = 0;
    for chunk in stream.chunks(CHUNK) {
        decoder.feed(chunk);
        while let Some(message) = decoder.next_message() {
            black_box(message.map_err(|e| format!("decoder: {e}"))?);
            count += 1;
        }
    }
    Ok(count)
}

fn serde_pass(stream: &[u8], ranges: &[(usize, usize)]) -> Result<usize, String> {
    for &(start, end) in ranges {
        let value: Value =
            serde_json::from_slice(&stream[start..end]).map_err(|e| format!("serde_json: {e}"))?;
        black_box(value);
    }
    Ok(ranges.len())
}
