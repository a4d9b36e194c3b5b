//! Fuzz target `console_ring`: arbitrary write / drain / read / close sequences against a
//! console-socket `Drainer` and its `Console`, over a real socketpair, with a small buffer.
//!
//! A model keeps every byte the peer wrote. Invariants: no panic; the buffer never holds more
//! than its capacity; `bytes_total` counts exactly what was drained and, after the end, every
//! byte written; consumed + dropped + unconsumed = total; and what is kept comes back exactly:
//! `read_available`, `read_line` and `wait_for` return the model's bytes from the first
//! unconsumed one (after the counted drops) on, `tail(n)` the model's last bytes. Nothing lost
//! beyond what `bytes_dropped` counts, nothing duplicated.
#![no_main]

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use console_socket::{Config, Console, DrainStatus, Drainer, Error, Pattern};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Step {
    /// The peer writes these bytes (as many as the socket takes).
    Write(Vec<u8>),
    /// The peer writes `count` copies of `byte` (floods past the capacity cheaply).
    Flood {
        byte: u8,
        count: u16,
    },
    /// The owner's poll reported readiness: drain.
    Drain,
    ReadAvailable,
    /// `read_line` with a zero timeout.
    ReadLine,
    /// `wait_for` a substring (one or two bytes) with a zero timeout.
    WaitFor(Vec<u8>),
    Tail(u16),
    /// The peer closes its end.
    PeerClose,
    /// The console is closed locally.
    Close,
}

struct Model {
    /// Every byte the peer managed to write.
    written: Vec<u8>,
    /// Stream offset of the first unconsumed byte, as the reads so far imply.
    consumed: u64,
    /// `bytes_dropped` when `consumed` was last moved.
    dropped: u64,
}

impl Model {
    /// Where the unconsumed bytes start now: drops since the last read evicted the oldest
    /// unconsumed bytes, which are contiguous from `consumed`.
    fn unconsumed_start(&self, console: &Console) -> u64 {
        let dropped = console.bytes_dropped();
        assert!(dropped >= self.dropped, "bytes_dropped went backwards");
        self.consumed + (dropped - self.dropped)
    }

    fn consume_to(&mut self, console: &Console, end: u64) {
        self.consumed = end;
        self.dropped = console.bytes_dropped();
    }

    fn range(&self, from: u64, to: u64) -> &[u8] {
        &self.written[from as usize..to as usize]
    }
}

fn check(console: &Console, model: &Model, capacity: usize) {
    let total = console.bytes_total();
    assert!(
        total as usize <= model.written.len(),
        "more read than written"
    );
    assert!(console.buffer_len() <= capacity, "buffer over capacity");
    assert!(console.unconsumed_len() <= console.buffer_len());
    let start = model.unconsumed_start(console);
    assert_eq!(
        start + console.unconsumed_len() as u64,
        total,
        "consumed + dropped + unconsumed != total"
    );
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    let capacity = u.int_in_range(1..=512usize)?;
    let (ours, peer) = UnixStream::pair().expect("socketpair");
    peer.set_nonblocking(true).expect("nonblocking");
    let config = Config::default().with_buffer_capacity(capacity);
    let (mut drainer, mut console) = Drainer::from_unix_stream(ours, config).expect("drainer");
    let mut peer = Some(peer);
    let mut model = Model {
        written: Vec::new(),
        consumed: 0,
        dropped: 0,
    };
    let mut closed_locally = false;
    let mut steps = 0;
    while !u.is_empty() && steps < 256 {
        steps += 1;
        match u.arbitrary::<Step>()? {
            Step::Write(bytes) => write(&mut peer, &mut model, &bytes),
            Step::Flood { byte, count } => {
                write(&mut peer, &mut model, &vec![byte; count as usize])
            }
            Step::Drain => {
                let status = drainer.drain();
                if closed_locally {
                    assert_eq!(status, DrainStatus::Closed);
                }
            }
            Step::ReadAvailable => {
                let start = model.unconsumed_start(&console);
                let out = console.read_available();
                let end = console.bytes_total();
                assert_eq!(out, model.range(start, end), "read_available");
                model.consume_to(&console, end);
            }
            Step::ReadLine => {
                let start = model.unconsumed_start(&console);
                let end = console.bytes_total();
                let pending = model.range(start, end);
                match console.read_line(Duration::ZERO) {
                    Ok(line) => {
                        let nl = pending
                            .iter()
                            .position(|&b| b == b'\n')
                            .expect("a line without a newline in the model");
                        let mut expected = &pending[..nl];
                        if expected.last() == Some(&b'\r') {
                            expected = &expected[..expected.len() - 1];
                        }
                        assert_eq!(line, expected, "read_line");
                        model.consume_to(&console, start + nl as u64 + 1);
                    }
                    Err(err) => {
                        assert!(
                            !pending.contains(&b'\n'),
                            "read_line missed a line: {err:?}"
                        );
                        failed_wait(err, &console, &mut model, start, end);
                    }
                }
            }
            Step::WaitFor(mut needle) => {
                needle.truncate(2);
                if needle.is_empty() {
                    continue;
                }
                let start = model.unconsumed_start(&console);
                let end = console.bytes_total();
                let pending = model.range(start, end).to_vec();
                let found = pending
                    .windows(needle.len())
                    .position(|w| w == needle.as_slice());
                match console.wait_for(&Pattern::substring(&needle), Duration::ZERO) {
                    Ok(m) => {
                        let at = found.expect("a match the model does not have");
                        let stop = at + needle.len();
                        assert_eq!(m.text(), &pending[..stop], "wait_for text");
                        assert_eq!(m.matched(), needle.as_slice());
                        assert_eq!(m.before(), &pending[..at]);
                        assert_eq!(m.offset(), start + at as u64, "wait_for offset");
                        model.consume_to(&console, start + stop as u64);
                    }
                    Err(err) => {
                        assert!(found.is_none(), "wait_for missed a match: {err:?}");
                        failed_wait(err, &console, &mut model, start, end);
                    }
                }
            }
            Step::Tail(n) => {
                let out = console.tail(n as usize);
                let end = console.bytes_total();
                let kept = (n as usize).min(console.buffer_len()) as u64;
                assert_eq!(out, model.range(end - kept, end), "tail");
            }
            Step::PeerClose => peer = None,
            Step::Close => {
                // The peer stops too: a write to a closed console would raise SIGPIPE, which
                // nothing ignores in a libFuzzer process.
                peer = None;
                let _ = console.close();
                closed_locally = true;
                assert!(console.is_closed());
            }
        }
        check(&console, &model, capacity);
    }
    // The end: the peer closes and the drain runs to the end of the stream. Unless the console
    // was closed locally first, every byte written was taken in.
    peer = None;
    drop(peer);
    let mut rounds = 0;
    while drainer.drain() != DrainStatus::Closed {
        rounds += 1;
        assert!(rounds < 1000, "the drain never sees the end of the stream");
    }
    check(&console, &model, capacity);
    if !closed_locally {
        assert_eq!(
            console.bytes_total() as usize,
            model.written.len(),
            "bytes lost"
        );
    }
    let start = model.unconsumed_start(&console);
    let out = console.read_available();
    let end = console.bytes_total();
    assert_eq!(out, model.range(start, end), "final read_available");
    Ok(())
}

/// A wait that found nothing: a timeout consumes nothing; a closed console hands the
/// unconsumed output over with the error (consumed), and it must be the model's bytes.
fn failed_wait(err: Error, console: &Console, model: &mut Model, start: u64, end: u64) {
    let _ = err.to_string();
    match err {
        Error::Timeout { .. } => {}
        Error::Closed { unconsumed, .. } => {
            assert_eq!(
                unconsumed,
                model.range(start, end),
                "output handed over at close"
            );
            model.consume_to(console, end);
        }
        other => panic!("a wait failed with {other:?}"),
    }
}

/// Writes as much of `bytes` as the socket takes without blocking; records what went in.
fn write(peer: &mut Option<UnixStream>, model: &mut Model, bytes: &[u8]) {
    let Some(stream) = peer.as_mut() else {
        return;
    };
    let mut rest = bytes;
    while !rest.is_empty() {
        match stream.write(rest) {
            Ok(0) => break,
            Ok(n) => {
                model.written.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // Full socket buffer, or the console closed its end: the rest is not written.
            Err(_) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
