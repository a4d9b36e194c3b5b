//! A compact JSON writer that cannot fail, so encoding QMP messages needs no `Result`.
//!
//! Every byte we send QEMU costs latency (QEMU 7.2 reads its monitor one byte per system call),
//! so the output has no whitespace at all and escapes only what JSON requires. Non-ASCII text
//! is written as raw UTF-8, which is never longer than its `\uXXXX` escape.

use std::fmt::Write as _;

use serde_json::{Map, Value};

/// Appends the compact JSON text of `value` to `out`.
pub(crate) fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => {
            // serde_json's `Display` for `Number` prints exactly its JSON form (itoa or the
            // shortest round-tripping float); `VecWriter` never fails, so neither does this.
            let _ = write!(VecWriter(out), "{number}");
        }
        Value::String(text) => write_str(out, text),
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => write_map(out, map),
    }
}

/// Appends the compact JSON text of an object to `out`.
pub(crate) fn write_map(out: &mut Vec<u8>, map: &Map<String, Value>) {
    out.push(b'{');
    for (index, (key, item)) in map.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        write_str(out, key);
        out.push(b':');
        write_value(out, item);
    }
    out.push(b'}');
}

/// Appends `"key":` to `out`, for hand-built objects.
pub(crate) fn write_key(out: &mut Vec<u8>, key: &str) {
    write_str(out, key);
    out.push(b':');
}

/// Appends `text` as a JSON string literal, escaping only what JSON requires.
pub(crate) fn write_str(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run_start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[run_start..index]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        run_start = index + 1;
    }
    out.extend_from_slice(&bytes[run_start..]);
    out.push(b'"');
}

/// Appends a decimal integer to `out`.
pub(crate) fn write_i64(out: &mut Vec<u8>, number: i64) {
    // `VecWriter` never fails, so neither does formatting an integer into it.
    let _ = write!(VecWriter(out), "{number}");
}

/// `fmt::Write` over a byte vector; infallible.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn encoded(value: &Value) -> String {
        let mut out = Vec::new();
        write_value(&mut out, value);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn matches_serde_json_compact_output() {
        let values = [
            json!(null),
            json!({"a": [1, -2, 3.5, 1e300, true, false, null], "b": {"c": "d"}}),
            json!("quote \" backslash \\ newline \n tab \t cr \r bs \u{8} ff \u{c} nul \u{0} us \u{1f} del \u{7f}"),
            json!("ünïcödé ✓ 😀"),
            json!(u64::MAX),
            json!(i64::MIN),
            json!([]),
            json!({}),
        ];
        for value in values {
            assert_eq!(encoded(&value), serde_json::to_string(&value).unwrap());
        }
    }

    #[test]
    fn integers() {
        let mut out = Vec::new();
        write_i64(&mut out, -1);
        out.push(b' ');
        write_i64(&mut out, 1_700_000_000);
        assert_eq!(out, b"-1 1700000000");
    }
}
