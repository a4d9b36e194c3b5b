//! Decoder throughput on the recorded QEMU transcripts, beside `serde_json::from_slice::<Value>`
//! on the same messages in the same run (the target: at least 0.8x serde_json).
//!
//! The decoder is fed 64 KiB chunks, as a socket reader would, and every message is pulled and
//! classified (`next_message`), or only framed and parsed (`next_object`); the baseline parses
//! each message's bytes, already cut out, into a `Value`. Times are this thread's CPU time
//! (the machine is shared), best of several interleaved rounds.

use qmp_proto::Decoder;
use serde_json::Value;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const TARGET_BYTES: usize = 4 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
const ROUNDS: usize = 15;

fn fixture(name: &str) -> Vec<u8> {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", name]
        .iter()
        .collect();
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The byte ranges of the messages in `stream`, found once with serde_json.
fn message_ranges(stream: &[u8]) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut values =
        serde_json::Deserializer::from_slice(stream).into_iter::<serde::de::IgnoredAny>();
    let mut start = 0;
    while let Some(item) = values.next() {
        item.expect("fixtures are valid JSON");
        let end = values.byte_offset();
        let text = &stream[start..end];
        let skip = text.iter().take_while(|b| b.is_ascii_whitespace()).count();
        ranges.push((start + skip, end));
        start = end;
    }
    ranges
}

fn decoder_pass(stream: &[u8]) -> usize {
    let mut decoder = Decoder::new();
    let mut count = 0;
    for chunk in stream.chunks(CHUNK) {
        decoder.feed(chunk);
        while let Some(message) = decoder.next_message() {
            black_box(message.expect("fixtures decode"));
            count += 1;
        }
    }
    count
}

fn object_pass(stream: &[u8]) -> usize {
    let mut decoder = Decoder::new();
    let mut count = 0;
    for chunk in stream.chunks(CHUNK) {
        decoder.feed(chunk);
        while let Some(message) = decoder.next_object() {
            black_box(message.expect("fixtures decode"));
            count += 1;
        }
    }
    count
}

fn serde_pass(stream: &[u8], ranges: &[(usize, usize)]) -> usize {
    for &(start, end) in ranges {
        let value: Value = serde_json::from_slice(&stream[start..end]).expect("valid JSON");
        black_box(value);
    }
    ranges.len()
}

/// A clock of this thread's CPU time (from `/proc/thread-self/schedstat`, in nanoseconds),
/// so that other processes on the shared machine do not count against either side; falls
/// back to wall time where that file does not exist.
struct Clock {
    cpu: Option<Duration>,
    wall: Instant,
}

fn thread_cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

impl Clock {
    fn start() -> Clock {
        Clock {
            cpu: thread_cpu_time(),
            wall: Instant::now(),
        }
    }

    fn elapsed(&self) -> Duration {
        match (self.cpu, thread_cpu_time()) {
            (Some(start), Some(now)) => now.saturating_sub(start),
            _ => self.wall.elapsed(),
        }
    }
}

fn mb_per_s(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / 1e6 / time.as_secs_f64()
}

fn run(label: &str, names: &[&str]) {
    let mut unit = Vec::new();
    for name in names {
        unit.extend_from_slice(&fixture(name));
    }
    let mut stream = Vec::with_capacity(TARGET_BYTES + unit.len());
    while stream.len() < TARGET_BYTES {
        stream.extend_from_slice(&unit);
    }
    let ranges = message_ranges(&stream);
    assert_eq!(decoder_pass(&stream), ranges.len(), "message counts differ");

    let mut ours = Vec::new();
    let mut objects = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..ROUNDS {
        // Interleaved so that all three see the same machine load.
        let started = Clock::start();
        black_box(decoder_pass(black_box(&stream)));
        ours.push(started.elapsed());
        let started = Clock::start();
        black_box(object_pass(black_box(&stream)));
        objects.push(started.elapsed());
        let started = Clock::start();
        black_box(serde_pass(black_box(&stream), &ranges));
        theirs.push(started.elapsed());
    }
    // The fastest round of each: the machine is shared, and interference only adds time.
    let best = |times: &[Duration]| times.iter().min().copied().unwrap_or_default();
    let mbs = |times: &[Duration]| mb_per_s(stream.len(), best(times));
    let (ours_mbs, objects_mbs, theirs_mbs) = (mbs(&ours), mbs(&objects), mbs(&theirs));
    println!(
        "qmp-proto decode [{label}] {:.1} MB, {} messages: Decoder::next_message {ours_mbs:.0} MB/s \
         (next_object {objects_mbs:.0} MB/s), serde_json::from_slice::<Value> {theirs_mbs:.0} MB/s, \
         ratio {:.2}x (best of {ROUNDS}, thread CPU time)",
        stream.len() as f64 / 1e6,
        ranges.len(),
        ours_mbs / theirs_mbs,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects workloads by label.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let workloads: [(&str, &[&str]); 4] = [
        (
            "all transcripts",
            &["session.server", "session-pretty.server", "schema.server"],
        ),
        ("session, compact", &["session.server"]),
        ("session, pretty=on", &["session-pretty.server"]),
        ("query-qmp-schema", &["schema.server"]),
    ];
    for (label, names) in workloads {
        if filter.as_deref().is_none_or(|f| label.contains(f)) {
            run(label, names);
        }
    }
}
