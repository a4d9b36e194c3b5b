//! How replies and events look on stdout: pretty JSON for people, compact JSON for programs,
//! and one timestamped line per event.

use serde_json::{Map, Value};
use std::io::{IsTerminal, Write};

use crate::error::{Error, Result};

/// Writes `text` and a newline to stderr. A closed or broken stderr (the terminal hung up) is
/// ignored: diagnostics must never turn into a panic, as `eprintln!` would.
pub fn note(text: &str) {
    let mut stderr = std::io::stderr().lock();
    // Nothing sensible is left to do when stderr itself fails.
    let _ = writeln!(stderr, "{text}");
}

/// Writes how QEMU ended to stderr: one line after a clean stop, the full report (ladder
/// steps, last events, output and console tails, command line) after an abnormal end.
pub fn note_report(report: &machine_core::ExitReport) {
    if report.clean() {
        note(&report.summary());
    } else {
        note(report.to_string().trim_end());
    }
}

/// Writes `text` and a newline to stdout and flushes, so a reader sees each line at once.
/// A closed pipe comes back as [`Error::Io`] with `BrokenPipe`, which `main` exits on quietly.
pub fn emit(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(|source| Error::Io {
            what: "writing to stdout",
            source,
        })
}

/// How JSON values are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// One line, no spaces: for pipes and `--json`.
    Compact,
    /// Indented by four spaces, keys sorted: for people.
    Pretty,
}

impl Style {
    /// Pretty when `pretty` is asked for, compact when `json` is, else pretty on a terminal.
    pub fn choose(json: bool, pretty: bool) -> Style {
        if pretty {
            Style::Pretty
        } else if json || !std::io::stdout().is_terminal() {
            Style::Compact
        } else {
            Style::Pretty
        }
    }
}

/// `value` as JSON text in `style`. Keys come out sorted (serde_json's map is ordered).
pub fn json(value: &Value, style: Style) -> String {
    match style {
        Style::Compact => value.to_string(),
        Style::Pretty => {
            let mut out = Vec::new();
            let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
            let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
            match serde::Serialize::serialize(value, &mut serializer) {
                Ok(()) => String::from_utf8_lossy(&out).into_owned(),
                // Serializing a Value into memory cannot fail; fall back to compact anyway.
                Err(_) => value.to_string(),
            }
        }
    }
}

/// An event as printed: the fields of QMP's event object.
#[derive(Clone, Debug, PartialEq)]
pub struct EventView<'a> {
    /// The event name.
    pub name: &'a str,
    /// Its data, if any.
    pub data: Option<&'a Value>,
    /// Seconds of QEMU's timestamp (`-1` when QEMU had no clock).
    pub seconds: i64,
    /// Microseconds of QEMU's timestamp.
    pub microseconds: i64,
}

impl EventView<'_> {
    /// The whole event object, as QEMU sent it (for JSON Lines).
    pub fn to_value(&self) -> Value {
        let mut timestamp = Map::new();
        timestamp.insert("seconds".to_string(), Value::from(self.seconds));
        timestamp.insert("microseconds".to_string(), Value::from(self.microseconds));
        let mut object = Map::new();
        object.insert("event".to_string(), Value::String(self.name.to_string()));
        if let Some(data) = self.data {
            object.insert("data".to_string(), data.clone());
        }
        object.insert("timestamp".to_string(), Value::Object(timestamp));
        Value::Object(object)
    }

    /// One human line: `2026-11-25T16:30:08.123456Z SHUTDOWN {"guest":false,...}`.
    pub fn human_line(&self) -> String {
        let mut line = format_timestamp(self.seconds, self.microseconds);
        line.push(' ');
        line.push_str(self.name);
        if let Some(data) = self.data {
            line.push(' ');
            line.push_str(&data.to_string());
        }
        line
    }

    /// The event in `--json` form (one compact line) or human form.
    pub fn render(&self, as_json: bool) -> String {
        if as_json {
            self.to_value().to_string()
        } else {
            self.human_line()
        }
    }
}

/// A QEMU timestamp as UTC RFC 3339 with microseconds; `-` when QEMU had no clock (QEMU
/// sends `-1` then) or the value is out of range.
pub fn format_timestamp(seconds: i64, microseconds: i64) -> String {
    if seconds < 0 || !(0..1_000_000).contains(&microseconds) {
        return "-".to_string();
    }
    // In range by the check above; the nanoseconds fit an i32.
    let nanos = i32::try_from(microseconds * 1000).unwrap_or(0);
    match jiff::Timestamp::new(seconds, nanos) {
        Ok(timestamp) => format!("{timestamp:.6}"),
        Err(_) => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps() {
        assert_eq!(format_timestamp(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            format_timestamp(1_700_000_000, 42),
            "2023-11-14T22:13:20.000042Z"
        );
        // A leap day and the last second of a year.
        assert_eq!(
            format_timestamp(951_782_400, 999_999),
            "2000-02-29T00:00:00.999999Z"
        );
        assert_eq!(
            format_timestamp(4_102_444_799, 0),
            "2099-12-31T23:59:59.000000Z"
        );
        assert_eq!(format_timestamp(-1, -1), "-");
        // Beyond the years jiff supports (9999).
        assert_eq!(format_timestamp(i64::MAX, 0), "-");
        assert_eq!(format_timestamp(5, 1_000_000), "-");
    }

    #[test]
    fn event_lines() {
        let data = json!({"guest": false, "reason": "host-qmp-quit"});
        let event = EventView {
            name: "SHUTDOWN",
            data: Some(&data),
            seconds: 1_700_000_000,
            microseconds: 5,
        };
        assert_eq!(
            event.human_line(),
            r#"2023-11-14T22:13:20.000005Z SHUTDOWN {"guest":false,"reason":"host-qmp-quit"}"#
        );
        assert_eq!(
            event.render(true),
            r#"{"data":{"guest":false,"reason":"host-qmp-quit"},"event":"SHUTDOWN","timestamp":{"microseconds":5,"seconds":1700000000}}"#
        );
        let bare = EventView {
            name: "STOP",
            data: None,
            seconds: 0,
            microseconds: 0,
        };
        assert_eq!(bare.human_line(), "1970-01-01T00:00:00.000000Z STOP");
    }

    #[test]
    fn json_styles() {
        let value = json!({"b": [1, 2], "a": {"x": null}});
        assert_eq!(
            json(&value, Style::Compact),
            r#"{"a":{"x":null},"b":[1,2]}"#
        );
        assert_eq!(
            json(&value, Style::Pretty),
            "{\n    \"a\": {\n        \"x\": null\n    },\n    \"b\": [\n        1,\n        2\n    ]\n}"
        );
        assert_eq!(Style::choose(false, true), Style::Pretty);
        assert_eq!(Style::choose(true, false), Style::Compact);
    }
}
