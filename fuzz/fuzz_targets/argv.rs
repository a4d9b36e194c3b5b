//! Fuzz target `argv`: arbitrary option values go through machine-core's comma escaping into
//! a QEMU option string, which is parsed back the way QEMU 7.2 parses it
//! (`util/qemu-option.c`: `get_opt_name`, `get_opt_value`; ported below, independent of our
//! code), and an argv is printed as `CommandLine` shows it and split back the way a POSIX
//! shell splits it.
//!
//! Invariants: no panic; the option string has exactly the keys we wrote, and each value
//! comes back byte for byte (no value can add a key, however many commas, `=` or newlines it
//! holds); `escape_value` and `escape_os_value` agree; `split_options` agrees with QEMU's
//! parser; the printed command line, split by a shell, gives back the argv (UTF-8 elements).
//!
//! Input layout: values separated by NUL (no argv element can hold a NUL).
#![no_main]

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use libfuzzer_sys::fuzz_target;
use machine_core::{escape_os_value, escape_value, split_options, CommandLine};

/// QEMU's `get_opt_value`: reads up to a single comma, a doubled comma being a literal one.
/// Returns the value and the rest after the terminating comma (None at the end).
fn get_opt_value(p: &[u8]) -> (Vec<u8>, Option<&[u8]>) {
    let mut value = Vec::new();
    let mut p = p;
    loop {
        let offset = p.iter().position(|&b| b == b',').unwrap_or(p.len());
        value.extend_from_slice(&p[..offset]);
        if offset == p.len() {
            return (value, None);
        }
        if p.get(offset + 1) == Some(&b',') {
            value.push(b',');
            p = &p[offset + 2..];
        } else {
            return (value, Some(&p[offset + 1..]));
        }
    }
}

/// QEMU's `opts_do_parse` with an implied first option (`-chardev socket,...` implies
/// `backend`): a list of (name, value). A name runs up to `=` or `,`; without `=` the option
/// is a flag (`on`, or `off` for a `no` prefix).
fn qemu_parse(params: &[u8], implied: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = Some(params);
    let mut first = true;
    while let Some(p) = rest {
        if p.is_empty() {
            break;
        }
        let name_end = p
            .iter()
            .position(|&b| b == b'=' || b == b',')
            .unwrap_or(p.len());
        if first && p.get(name_end) != Some(&b'=') {
            let (value, next) = get_opt_value(p);
            out.push((implied.as_bytes().to_vec(), value));
            rest = next;
        } else if p.get(name_end) == Some(&b'=') {
            let name = p[..name_end].to_vec();
            let (value, next) = get_opt_value(&p[name_end + 1..]);
            out.push((name, value));
            rest = next;
        } else {
            let name = &p[..name_end];
            let (name, value) = match name.strip_prefix(b"no") {
                Some(flag) => (flag.to_vec(), b"off".to_vec()),
                None => (name.to_vec(), b"on".to_vec()),
            };
            out.push((name, value));
            rest = p.get(name_end + 1..);
        }
        first = false;
    }
    out
}

/// Splits a command line the way a POSIX shell splits words made of plain characters and
/// single-quoted strings (all `CommandLine`'s display uses), joined by single spaces.
fn shell_split(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    word.push(q);
                }
            }
            '\\' => {
                in_word = true;
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            other => {
                in_word = true;
                word.push(other);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

fuzz_target!(|data: &[u8]| {
    let values: Vec<&[u8]> = data.split(|&b| b == 0).take(16).collect();
    for value in &values {
        let escaped = escape_os_value(OsStr::from_bytes(value));
        let mut options = b"socket,id=mon,path=".to_vec();
        options.extend_from_slice(escaped.as_bytes());
        options.extend_from_slice(b",server=on,wait=off");
        let parsed = qemu_parse(&options, "backend");
        let expected: Vec<(Vec<u8>, Vec<u8>)> = vec![
            (b"backend".to_vec(), b"socket".to_vec()),
            (b"id".to_vec(), b"mon".to_vec()),
            (b"path".to_vec(), value.to_vec()),
            (b"server".to_vec(), b"on".to_vec()),
            (b"wait".to_vec(), b"off".to_vec()),
        ];
        assert_eq!(
            parsed,
            expected,
            "value {:?}",
            String::from_utf8_lossy(value)
        );
        if let Ok(text) = std::str::from_utf8(value) {
            assert_eq!(escape_value(text).as_bytes(), escaped.as_bytes());
            let options = String::from_utf8(options).expect("utf-8 in, utf-8 out");
            let split = split_options(&options);
            let from_qemu: Vec<String> = parsed
                .iter()
                .skip(1)
                .map(|(k, v)| {
                    format!(
                        "{}={}",
                        String::from_utf8_lossy(k),
                        String::from_utf8_lossy(v)
                    )
                })
                .collect();
            assert_eq!(split[0], "socket");
            assert_eq!(
                split[1..],
                from_qemu[..],
                "split_options disagrees with QEMU"
            );
        }
    }
    // The printed command line is what a person pastes into a shell.
    let argv: Vec<OsString> = std::iter::once(OsString::from("qemu-system-x86_64"))
        .chain(
            values
                .iter()
                .filter(|v| std::str::from_utf8(v).is_ok())
                .map(|v| OsString::from_vec(v.to_vec())),
        )
        .collect();
    let line = CommandLine::new(argv.clone()).to_string();
    let words = shell_split(&line);
    let expected: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(words, expected, "shell splitting {line:?}");
});
