//! Building QEMU's command line safely: comma escaping, the argv layout of QEMU's Python `qemu.machine`, printing.
//!
//! QEMU splits option strings such as `socket,id=mon,path=P` at every single comma and reads a
//! doubled comma as a literal one. Every value we put into such a string on the caller's
//! behalf (paths, host names, opaque strings) goes through [`escape_value`], so a path like
//! `/tmp/a,server=on` stays one literal path and cannot add options.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// Doubles every comma in `value`, the escaping QEMU's option parser expects.
///
/// ```
/// assert_eq!(machine_core::escape_value("/tmp/a,server=on"), "/tmp/a,,server=on");
/// ```
pub fn escape_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// [`escape_value`] for an `OsStr` (paths need not be UTF-8).
pub fn escape_os_value(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// Splits a QEMU option string into its `key=value` parts the way QEMU does (a doubled comma
/// is a literal comma). Used by tests to prove that escaped values cannot inject keys.
pub fn split_options(options: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = options.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                parts.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts
}

/// An option string under construction: `kind,key=value,...` with escaped values.
#[derive(Debug, Clone)]
pub(crate) struct OptString(OsString);

impl OptString {
    /// Starts with a bare first element (e.g. the chardev backend `socket`), taken verbatim.
    pub(crate) fn new(head: &str) -> Self {
        OptString(OsString::from(head))
    }

    /// Appends `,key=value` with `value` escaped.
    pub(crate) fn value(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.0.push(",");
        self.0.push(key);
        self.0.push("=");
        self.0.push(escape_os_value(value.as_ref()));
        self
    }

    /// Appends `,raw` verbatim: for option strings the caller wrote on purpose.
    pub(crate) fn raw(mut self, raw: &str) -> Self {
        if !raw.is_empty() {
            self.0.push(",");
            self.0.push(raw);
        }
        self
    }

    pub(crate) fn into_os_string(self) -> OsString {
        self.0
    }
}

/// The full command line of one launch: wrapper, binary, base arguments and user arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandLine {
    argv: Vec<OsString>,
}

impl CommandLine {
    /// Wraps a complete argv (element 0 is the program).
    pub fn new(argv: Vec<OsString>) -> Self {
        CommandLine { argv }
    }

    /// Every element, program first.
    pub fn argv(&self) -> &[OsString] {
        &self.argv
    }

    /// The program that is executed (the wrapper's first element when there is one).
    pub fn program(&self) -> Option<&OsStr> {
        self.argv.first().map(OsString::as_os_str)
    }

    /// Whether a `-device` option names `driver` (as `driver,...` or `driver=driver`).
    pub(crate) fn has_device(&self, driver: &str) -> bool {
        self.argv
            .windows(2)
            .filter(|pair| pair[0] == "-device" || pair[0] == "--device")
            .any(|pair| {
                let value = pair[1].to_string_lossy();
                value.split(',').enumerate().any(|(i, option)| {
                    (i == 0 && option == driver) || option.strip_prefix("driver=") == Some(driver)
                })
            })
    }
}

impl fmt::Display for CommandLine {
    /// Prints the argv as a shell would need it: elements with unusual characters are quoted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, arg) in self.argv.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            let text = arg.to_string_lossy();
            let plain = !text.is_empty()
                && text.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, '-' | '_' | '.' | '/' | ',' | '=' | ':' | '+' | '@')
                });
            if plain {
                f.write_str(&text)?;
            } else {
                write!(f, "'{}'", text.replace('\'', r"'\''"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_found_by_driver_name() {
        let line = |args: &[&str]| CommandLine::new(args.iter().map(OsString::from).collect());
        let with = line(&["qemu", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        assert!(with.has_device("isa-debug-exit"));
        assert!(
            line(&["qemu", "-device", "driver=isa-debug-exit,iobase=0xf4"])
                .has_device("isa-debug-exit")
        );
        assert!(!line(&["qemu", "-device", "isa-debug-exit-not"]).has_device("isa-debug-exit"));
        assert!(!line(&["qemu", "-name", "isa-debug-exit"]).has_device("isa-debug-exit"));
    }

    #[test]
    fn escaping_doubles_commas() {
        let table = [
            ("", ""),
            ("plain", "plain"),
            (",", ",,"),
            ("a,b", "a,,b"),
            (",,", ",,,,"),
            ("/tmp/a,server=on", "/tmp/a,,server=on"),
        ];
        for (input, expected) in table {
            assert_eq!(escape_value(input), expected, "input {input:?}");
            assert_eq!(escape_os_value(OsStr::new(input)), OsString::from(expected));
        }
    }

    #[test]
    fn escaped_values_cannot_inject_keys() {
        let hostile = [
            "/tmp/a,server=on",
            "x,wait=off,path=/etc/passwd",
            ",",
            "a,,b",
            "trailing,",
            ",leading",
            "new\nline",
            "-leading-dash",
            "$(rm -rf /);`x`",
            "sp ace=1",
        ];
        for value in hostile {
            let opts = OptString::new("socket")
                .value("id", "mon")
                .value("path", value)
                .into_os_string();
            let parts = split_options(&opts.to_string_lossy());
            assert_eq!(parts.len(), 3, "{value:?} -> {parts:?}");
            assert_eq!(parts[0], "socket");
            assert_eq!(parts[1], "id=mon");
            assert_eq!(parts[2], format!("path={value}"));
        }
    }

    #[test]
    fn non_utf8_paths_are_escaped_bytewise() {
        let raw = OsStr::from_bytes(b"/tmp/\xff,x");
        assert_eq!(escape_os_value(raw).as_bytes(), b"/tmp/\xff,,x");
    }

    #[test]
    fn raw_parts_are_verbatim_and_empty_raw_adds_nothing() {
        let opts = OptString::new("fd=3")
            .raw("")
            .raw("a=1,b=2")
            .into_os_string();
        assert_eq!(opts, OsString::from("fd=3,a=1,b=2"));
    }

    #[test]
    fn command_line_display_quotes_what_a_shell_would_split() {
        let cl = CommandLine::new(vec![
            "qemu".into(),
            "-name".into(),
            "a b".into(),
            "it's".into(),
            "socket,id=mon,fd=3".into(),
            "".into(),
        ]);
        assert_eq!(
            cl.to_string(),
            r"qemu -name 'a b' 'it'\''s' socket,id=mon,fd=3 ''"
        );
        assert_eq!(cl.program(), Some(OsStr::new("qemu")));
    }
}
