//! Fuzz target `shell_line`: the qmp-shell language of `qemu-machine shell` (`machine_cli::lang`).
//!
//! Two halves, picked by the first byte:
//! - arbitrary text, line by line, through one `QmpParser` (transactions carry over between
//!   lines) and the HMP-mode parser: no panic; every error prints; every request is an object
//!   with a non-empty `execute` whose JSON encoding reads back equal through our decoder, whose
//!   depth limit is QEMU's (so the shell never sends what QEMU refuses); a raw JSON command line
//!   printed back as a line parses to the same request; a cancelled transaction leaves the
//!   parser outside any transaction;
//! - arbitrary strings written as `command key="json-quoted" key='single-quoted'` come back
//!   as exactly those strings under exactly those keys (quoting and tokenizing are inverse).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use machine_cli::lang::{parse_hmp_line, HmpLine, QmpParser};
use qmp_proto::Decoder;
use serde_json::{Map, Value};

#[derive(Arbitrary, Debug)]
struct Quoted {
    /// `[a-z_-]` key, made unique by a suffix.
    key: Vec<u8>,
    value: String,
    single: bool,
}

fn arbitrary_lines(text: &str) {
    let mut parser = QmpParser::new();
    for line in text.split('\n') {
        let was_open = parser.in_transaction();
        match parser.parse_line(line) {
            Ok(Some(request)) => {
                assert!(!request.execute.is_empty() || line.trim_start().starts_with('{'));
                let value = request.to_value();
                let encoded = serde_json::to_string(&value).expect("encode");
                // Read back with our decoder, whose depth limit is QEMU's (1024): every
                // request the shell accepts must be one QEMU accepts too.
                let mut decoder = Decoder::new();
                decoder.feed(encoded.as_bytes());
                decoder.feed(b"\n");
                match decoder.next_object() {
                    Some(Ok(object)) => assert_eq!(Value::Object(object), value),
                    other => panic!("the shell accepted {line:?}, the decoder gives {other:?}"),
                }
                if !was_open && line.trim_start().starts_with('{') {
                    // A raw command line: printed back compact on one line, it is the same.
                    let mut again = QmpParser::new();
                    let reparsed = again
                        .parse_line(&encoded)
                        .expect("a printed command parses")
                        .expect("a printed command is a request");
                    assert_eq!(reparsed, request);
                }
            }
            Ok(None) => {}
            Err(err) => {
                let _ = err.to_string();
            }
        }
        if line.contains("cancel") {
            parser.cancel_transaction();
            assert!(!parser.in_transaction());
        }
        match parse_hmp_line(line) {
            Ok(HmpLine::Command(text)) => {
                assert_eq!(text, line.trim());
                assert!(!text.is_empty());
            }
            Ok(HmpLine::Empty) => assert!(line.trim().is_empty()),
            Ok(HmpLine::SelectCpu(_)) => assert!(line.trim().starts_with("cpu")),
            Err(err) => {
                let _ = err.to_string();
            }
        }
    }
}

fn quoted_round_trip(u: &mut Unstructured<'_>) -> arbitrary::Result<()> {
    let items: Vec<Quoted> = u.arbitrary()?;
    let mut line = String::from("query-x");
    let mut expected = Map::new();
    for (i, item) in items.iter().take(16).enumerate() {
        let mut key: String = item
            .key
            .iter()
            .take(8)
            .map(|b| match b % 28 {
                26 => '_',
                27 => '-',
                n => (b'a' + n) as char,
            })
            .collect();
        key.push_str(&format!("k{i}"));
        let raw = if item.single {
            format!(
                "'{}'",
                item.value.replace('\\', "\\\\").replace('\'', "\\'")
            )
        } else {
            serde_json::to_string(&item.value).expect("a string encodes")
        };
        line.push(' ');
        line.push_str(&key);
        line.push('=');
        line.push_str(&raw);
        expected.insert(key, Value::String(item.value.clone()));
    }
    let request = QmpParser::new()
        .parse_line(&line)
        .unwrap_or_else(|e| panic!("{line:?}: {e}"))
        .expect("a command line is a request");
    assert_eq!(request.execute, "query-x");
    let arguments = request.arguments.unwrap_or_default();
    assert_eq!(arguments, expected, "line {line:?}");
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        arbitrary_lines(&String::from_utf8_lossy(rest));
    } else {
        let _ = quoted_round_trip(&mut Unstructured::new(rest));
    }
});
