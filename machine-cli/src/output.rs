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

/// A QEMU timestamp as UTC ISO 8601 with microseconds; `-` when QEMU had no clock.
pub fn format_timestamp(seconds: i64, microseconds: i64) -> String {
    if seconds < 0 || !(0..1_000_000).contains(&microseconds) {
        return "-".to_string();
    }
    let days = seconds.div_euclid(86_400);
    let secs_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{microseconds:06}Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60
    )
}

/// The proleptic Gregorian date of a count of days since 1970-01-01.
///
/// Works in 400-year eras (146,097 days each) counted from 0000-03-01, so that the leap day is
/// the last day of each "year" and months have a fixed pattern.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
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
        assert_eq!(format_timestamp(5, 1_000_000), "-");
    }

    #[test]
    fn civil_dates_agree_with_a_day_by_day_walk() {
        let (mut y, mut m, mut d) = (1970i64, 1u32, 1u32);
        for days in 0..(366 * 450) {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > len {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
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
