//! The qtest wire format without I/O: line framing, reply classification and the hex and
//! base64 codecs that `read`/`write`/`b64read`/`b64write` use.

use std::fmt::Write as _;

/// Whether an IRQ line went up or down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqEdge {
    /// `IRQ raise N`: the line went high.
    Raise,
    /// `IRQ lower N`: the line went low.
    Lower,
}

impl IrqEdge {
    /// The word QEMU uses on the wire (`raise` or `lower`).
    pub fn as_str(self) -> &'static str {
        match self {
            IrqEdge::Raise => "raise",
            IrqEdge::Lower => "lower",
        }
    }

    /// The level the line has after this edge (`true` = high).
    pub fn level(self) -> bool {
        self == IrqEdge::Raise
    }
}

/// One asynchronous `IRQ raise N` / `IRQ lower N` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IrqEvent {
    /// The intercepted GPIO number (for `ioapic`, the ISA IRQ number; IRQ0 stays 0).
    pub irq: u32,
    /// Which way it went.
    pub edge: IrqEdge,
}

/// What one line from QEMU is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// An asynchronous IRQ notification: never a reply.
    Irq(IrqEvent),
    /// A line starting with `IRQ` that does not parse: asynchronous noise, never a reply.
    BadIrq(String),
    /// `OK` with its words.
    Ok(Vec<String>),
    /// `FAIL ...` or `ERR ...`, with the rest of the line.
    Fail(String),
    /// Anything else: consumed as the (bad) reply of the pending command.
    Other(String),
}

/// Longest excerpt of a bad line kept in an error.
const EXCERPT: usize = 256;

/// A bounded, lossily decoded copy of a line for error messages.
pub(crate) fn excerpt(line: &[u8]) -> String {
    let cut = &line[..line.len().min(EXCERPT)];
    String::from_utf8_lossy(cut).into_owned()
}

/// Classifies one line (without its newline; a trailing `\r` is tolerated).
pub(crate) fn classify(line: &[u8]) -> Incoming {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(text) = std::str::from_utf8(line) else {
        return Incoming::Other(excerpt(line));
    };
    let mut words = text.split(' ');
    match words.next() {
        Some("IRQ") => {
            let edge = match words.next() {
                Some("raise") => Some(IrqEdge::Raise),
                Some("lower") => Some(IrqEdge::Lower),
                _ => None,
            };
            let irq = words.next().and_then(|n| n.parse::<u32>().ok());
            match (edge, irq, words.next()) {
                (Some(edge), Some(irq), None) => Incoming::Irq(IrqEvent { irq, edge }),
                _ => Incoming::BadIrq(excerpt(line)),
            }
        }
        Some("OK") => Incoming::Ok(words.filter(|w| !w.is_empty()).map(str::to_owned).collect()),
        Some("FAIL") | Some("ERR") => {
            let rest = text.split_once(' ').map(|(_, r)| r).unwrap_or("");
            Incoming::Fail(rest.to_owned())
        }
        _ => Incoming::Other(excerpt(line)),
    }
}

/// What `LineBuffer::next_line` found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Framed {
    /// A complete line, without its newline.
    Line(Vec<u8>),
    /// A line exceeded the limit; its bytes are being dropped up to the next newline.
    TooLong,
}

/// Splits the byte stream into lines, with a cap on the length of one line.
///
/// Consumed lines are skipped with an offset and the buffer is compacted only when the
/// consumed part dominates, so a burst of many short lines costs linear time.
#[derive(Debug)]
pub(crate) struct LineBuffer {
    buf: Vec<u8>,
    /// Start of the first unconsumed byte in `buf`.
    start: usize,
    /// Index in `buf` up to which no newline exists (from `start`).
    scanned: usize,
    max_line: usize,
    /// Dropping bytes until the next newline (after an oversized line was reported).
    discarding: bool,
}

impl LineBuffer {
    pub(crate) fn new(max_line: usize) -> Self {
        LineBuffer {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max_line: max_line.max(1),
            discarding: false,
        }
    }

    /// Appends bytes read from the socket.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The bytes of an incomplete line.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// The next complete line, an oversized-line report, or None when more bytes are needed.
    pub(crate) fn next_line(&mut self) -> Option<Framed> {
        loop {
            let from = self.scanned.max(self.start);
            match self.buf[from..].iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let end = from + pos;
                    let discarded = self.discarding;
                    let line = (!discarded && end - self.start <= self.max_line)
                        .then(|| self.buf[self.start..end].to_vec());
                    self.discarding = false;
                    self.start = end + 1;
                    self.scanned = self.start;
                    if self.start == self.buf.len() {
                        self.buf.clear();
                        self.start = 0;
                        self.scanned = 0;
                    }
                    if discarded {
                        continue;
                    }
                    return Some(line.map_or(Framed::TooLong, Framed::Line));
                }
                None => {
                    let unconsumed = self.buf.len() - self.start;
                    if self.discarding || unconsumed > self.max_line {
                        let report = !self.discarding;
                        self.buf.clear();
                        self.start = 0;
                        self.scanned = 0;
                        self.discarding = true;
                        return report.then_some(Framed::TooLong);
                    }
                    self.scanned = self.buf.len();
                    return None;
                }
            }
        }
    }
}

/// Parses an unsigned number the way QEMU prints them (`0x` hex or decimal).
pub(crate) fn parse_u64(word: &str) -> Option<u64> {
    match word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None => word.parse().ok(),
    }
}

/// Lowercase hex of `data` with a `0x` prefix (the `write` command's DATA).
pub(crate) fn hex_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(2 + data.len() * 2);
    out.push_str("0x");
    for b in data {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Decodes the `read` reply's `0x...` hex into bytes; None if malformed.
pub(crate) fn hex_decode(word: &str) -> Option<Vec<u8>> {
    let hex = word.strip_prefix("0x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    hex.chunks(2)
        .map(|pair| Some((nibble(pair[0])? << 4) | nibble(pair[1])?))
        .collect()
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Standard alphabet; padding written, and optional when reading (GLib's `g_base64_decode`,
/// which QEMU uses, takes both).
const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Standard base64 with padding (what GLib's `g_base64_encode` produces and decodes).
pub(crate) fn b64_encode(data: &[u8]) -> String {
    base64::Engine::encode(&B64, data)
}

/// Decodes standard base64 with optional padding; None if malformed.
pub(crate) fn b64_decode(text: &str) -> Option<Vec<u8>> {
    base64::Engine::decode(&B64, text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        let cases: &[(&[u8], Incoming)] = &[
            (b"OK", Incoming::Ok(vec![])),
            (b"OK 0x0601", Incoming::Ok(vec!["0x0601".into()])),
            (b"OK little\r", Incoming::Ok(vec!["little".into()])),
            (
                b"IRQ raise 1",
                Incoming::Irq(IrqEvent {
                    irq: 1,
                    edge: IrqEdge::Raise,
                }),
            ),
            (
                b"IRQ lower 255",
                Incoming::Irq(IrqEvent {
                    irq: 255,
                    edge: IrqEdge::Lower,
                }),
            ),
            (b"IRQ wobble 1", Incoming::BadIrq("IRQ wobble 1".into())),
            (b"IRQ raise -1", Incoming::BadIrq("IRQ raise -1".into())),
            (b"IRQ raise 1 2", Incoming::BadIrq("IRQ raise 1 2".into())),
            (
                b"FAIL Unknown command 'x'",
                Incoming::Fail("Unknown command 'x'".into()),
            ),
            (b"FAIL", Incoming::Fail(String::new())),
            (
                b"ERR invalid argument size",
                Incoming::Fail("invalid argument size".into()),
            ),
            (b"IRQX raise 1", Incoming::Other("IRQX raise 1".into())),
            (b"", Incoming::Other(String::new())),
            (b"\xff\xfe", Incoming::Other("\u{fffd}\u{fffd}".into())),
        ];
        for (line, want) in cases {
            assert_eq!(&classify(line), want, "line {line:?}");
        }
    }

    #[test]
    fn framing_split_merged_and_oversized() {
        let mut lb = LineBuffer::new(8);
        lb.feed(b"OK 0x");
        assert_eq!(lb.next_line(), None);
        lb.feed(b"1\nIRQ raise 1\nOK");
        assert_eq!(lb.next_line(), Some(Framed::Line(b"OK 0x1".to_vec())));
        // "IRQ raise 1" is 11 bytes: over the limit of 8.
        assert_eq!(lb.next_line(), Some(Framed::TooLong));
        assert_eq!(lb.next_line(), None);
        assert_eq!(lb.pending(), b"OK");
        lb.feed(b"\n");
        assert_eq!(lb.next_line(), Some(Framed::Line(b"OK".to_vec())));
        // An oversized line without a newline yet: reported once, then dropped to its end.
        lb.feed(b"0123456789");
        assert_eq!(lb.next_line(), Some(Framed::TooLong));
        lb.feed(b"abcdef");
        assert_eq!(lb.next_line(), None);
        lb.feed(b"gh\nOK 1\n");
        assert_eq!(lb.next_line(), Some(Framed::Line(b"OK 1".to_vec())));
        assert_eq!(lb.next_line(), None);
        assert!(lb.pending().is_empty());
    }

    #[test]
    fn framing_many_lines_in_odd_chunks() {
        let mut stream = Vec::new();
        for i in 0..5000u32 {
            stream.extend_from_slice(format!("IRQ raise {i}\n").as_bytes());
        }
        let mut lb = LineBuffer::new(64);
        let mut got = Vec::new();
        for chunk in stream.chunks(37) {
            lb.feed(chunk);
            while let Some(framed) = lb.next_line() {
                got.push(framed);
            }
        }
        assert_eq!(got.len(), 5000);
        for (i, framed) in got.iter().enumerate() {
            assert_eq!(framed, &Framed::Line(format!("IRQ raise {i}").into_bytes()));
        }
        assert!(lb.pending().is_empty());
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("0x0601"), Some(0x601));
        assert_eq!(parse_u64("0x00000000deadbeef"), Some(0xdead_beef));
        assert_eq!(parse_u64("123"), Some(123));
        assert_eq!(parse_u64("0x"), None);
        assert_eq!(parse_u64("-1"), None);
        assert_eq!(parse_u64("0xfffffffffffffffff"), None);
    }

    #[test]
    fn hex_round_trip() {
        let data = [0xef, 0xbe, 0xad, 0xde, 0x00, 0x01];
        let enc = hex_encode(&data);
        assert_eq!(enc, "0xefbeadde0001");
        assert_eq!(hex_decode(&enc).as_deref(), Some(&data[..]));
        assert_eq!(hex_decode("0xABcd"), Some(vec![0xab, 0xcd]));
        assert_eq!(hex_decode("0xabc"), None);
        assert_eq!(hex_decode("abcd"), None);
        assert_eq!(hex_decode("0xzz"), None);
    }

    #[test]
    fn base64_known_vectors() {
        let cases: &[(&[u8], &str)] = &[
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
            (&[0xef, 0xbe, 0xad, 0xde], "776t3g=="),
        ];
        for (raw, enc) in cases {
            assert_eq!(&b64_encode(raw), enc);
            assert_eq!(b64_decode(enc).as_deref(), Some(*raw));
        }
        assert_eq!(b64_decode("Zg"), Some(b"f".to_vec()));
        assert_eq!(b64_decode("Z"), None);
        assert_eq!(b64_decode("Zm9v!A=="), None);
        assert_eq!(b64_decode("Zg==="), None);
    }

    #[test]
    fn base64_all_lengths_round_trip() {
        let data: Vec<u8> = (0..=255u8).collect();
        for len in 0..data.len() {
            let enc = b64_encode(&data[..len]);
            assert_eq!(b64_decode(&enc).as_deref(), Some(&data[..len]), "len {len}");
        }
    }
}
