//! Recorded QMP sessions of real QEMUs, and their replay through the fake server (feature
//! `testing`), so tests that run without QEMU also run against each version's real bytes.
//!
//! A transcript is a JSON-lines file: a header line, then one line per message in either
//! direction with its time since the connection, then the end. `cargo xtask record` writes them
//! into this crate's `transcripts/` directory; [`recorded`] loads them all.
//!
//! ```text
//! {"transcript": "session", "qemu": "7.2.22", "package": "...", "argv": [...]}
//! {"ms": 0.412, "from": "qemu", "text": "{\"QMP\": {...}}\r\n"}
//! {"ms": 0.530, "from": "client", "text": "{\"execute\":\"qmp_capabilities\",\"id\":\"rec-1\"}"}
//! {"ms": 9.871, "end": "reset", "exit": 0}
//! ```
//!
//! [`Transcript::script`] turns one into a [`Script`]: the recorded greeting, then each command
//! the client sends is answered with the messages QEMU sent after the same command in the
//! recording (events and the reply, byte for byte, the reply's id swapped for the client's),
//! and the connection closes after the last recorded exchange, as QEMU closed it then.
//!
//! ```
//! use qmp_client::{replay, Config, Connection};
//!
//! for transcript in replay::recorded().unwrap() {
//!     if transcript.name != "session" {
//!         continue;
//!     }
//!     let (_server, stream) = transcript.script().start_pair().unwrap();
//!     let mut qmp = Connection::from_unix_stream(stream, &Config::default()).unwrap();
//!     let version = qmp.execute("query-version", None).unwrap();
//!     assert_eq!(version["qemu"]["major"].as_u64().map(|m| m.to_string()),
//!                transcript.qemu.split('.').next().map(str::to_string));
//! }
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use qmp_proto::Command;
use serde_json::Value;

use crate::testing::{Action, Script};

/// The directory `cargo xtask record` writes the transcripts into.
pub fn transcripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("transcripts")
}

/// Every transcript in [`transcripts_dir`], sorted by file name.
pub fn recorded() -> Result<Vec<Transcript>, String> {
    let dir = transcripts_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    paths.sort();
    paths.iter().map(|path| Transcript::load(path)).collect()
}

/// Which side wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// QEMU (greeting, replies, events).
    Qemu,
    /// The client (commands).
    Client,
}

/// One recorded message.
#[derive(Clone, Debug)]
pub struct Message {
    /// Time since the connection was made.
    pub at: Duration,
    /// Who wrote it.
    pub from: Side,
    /// Its exact text (QEMU's lines end in CRLF; commands were sent without a newline).
    pub text: String,
}

/// How QEMU ended the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct End {
    /// Time since the connection was made.
    pub at: Duration,
    /// `eof` (clean close) or `reset` (ECONNRESET: QEMU exited with our bytes unread).
    pub how: String,
    /// QEMU's exit code, or None when it was killed by a signal.
    pub exit: Option<i32>,
}

/// One recorded session.
#[derive(Clone, Debug)]
pub struct Transcript {
    /// What it covers (`session`, `guest-exit`...), from the header.
    pub name: String,
    /// QEMU's version number, e.g. `11.1.3`.
    pub qemu: String,
    /// The header line as recorded (argv, package, anything else the recorder noted).
    pub header: Value,
    /// Every message in order.
    pub messages: Vec<Message>,
    /// How it ended, if it ended.
    pub end: Option<End>,
}

impl Transcript {
    /// Reads a transcript file.
    pub fn load(path: &Path) -> Result<Transcript, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Transcript::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a transcript's text.
    pub fn parse(text: &str) -> Result<Transcript, String> {
        let mut lines = text.lines().enumerate();
        let header: Value = match lines.next() {
            Some((_, line)) => {
                serde_json::from_str(line).map_err(|e| format!("line 1: bad header: {e}"))?
            }
            None => return Err("empty transcript".to_string()),
        };
        let field = |name: &str| {
            header[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("line 1: the header has no string `{name}`"))
        };
        let mut transcript = Transcript {
            name: field("transcript")?,
            qemu: field("qemu")?,
            header: header.clone(),
            messages: Vec::new(),
            end: None,
        };
        for (index, line) in lines {
            let n = index + 1;
            let record: Value = serde_json::from_str(line).map_err(|e| format!("line {n}: {e}"))?;
            let at = record["ms"]
                .as_f64()
                .filter(|ms| ms.is_finite() && *ms >= 0.0)
                .map(|ms| Duration::from_secs_f64(ms / 1000.0))
                .ok_or_else(|| format!("line {n}: no time `ms`"))?;
            if let Some(how) = record["end"].as_str() {
                transcript.end = Some(End {
                    at,
                    how: how.to_string(),
                    exit: record["exit"].as_i64().and_then(|c| i32::try_from(c).ok()),
                });
                continue;
            }
            let from = match record["from"].as_str() {
                Some("qemu") => Side::Qemu,
                Some("client") => Side::Client,
                other => return Err(format!("line {n}: `from` is {other:?}")),
            };
            let text = record["text"]
                .as_str()
                .ok_or_else(|| format!("line {n}: no `text`"))?
                .to_string();
            transcript.messages.push(Message { at, from, text });
        }
        Ok(transcript)
    }

    /// The greeting's text, byte for byte.
    pub fn greeting(&self) -> Option<&str> {
        self.messages
            .first()
            .filter(|m| m.from == Side::Qemu)
            .map(|m| m.text.as_str())
    }

    /// Each command with what QEMU wrote after it, up to the next command.
    pub fn exchanges(&self) -> Vec<Exchange> {
        let mut exchanges: Vec<Exchange> = Vec::new();
        for message in self.messages.iter().skip(1) {
            match message.from {
                Side::Client => exchanges.push(Exchange {
                    command: serde_json::from_str(&message.text).unwrap_or(Value::Null),
                    at: message.at,
                    answer: Vec::new(),
                }),
                Side::Qemu => {
                    if let Some(last) = exchanges.last_mut() {
                        last.answer.push(message.clone());
                    }
                }
            }
        }
        exchanges
    }

    /// The server side of this transcript as a fake-server script (see the module docs).
    /// A command with no recorded exchange left gets a `GenericError` naming it.
    pub fn script(&self) -> Script {
        let exchanges = self.exchanges();
        let names: BTreeSet<String> = exchanges
            .iter()
            .filter_map(|e| e.command["execute"].as_str().map(str::to_string))
            .collect();
        let state = Arc::new(Mutex::new(ReplayState {
            exchanges: exchanges.into_iter().map(Some).collect(),
            cursor: 0,
            end: self.end.clone(),
        }));
        let mut script = Script::new().no_greeting();
        if let Some(greeting) = self.greeting() {
            script = script.before_greeting(vec![Action::raw(greeting.as_bytes())]);
        }
        for name in names {
            let state = Arc::clone(&state);
            script = script.on_fn(&name, move |command| answer(&state, command));
        }
        script.fallback(move |command| answer(&state, command))
    }
}

/// One command of a transcript and QEMU's answer to it.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The command as sent (`Value::Null` if it was not JSON: a deliberate garbage line).
    pub command: Value,
    /// When it was sent.
    pub at: Duration,
    /// What QEMU wrote after it, up to the next command.
    pub answer: Vec<Message>,
}

impl Exchange {
    /// The command's name (`execute` or `exec-oob`).
    pub fn name(&self) -> Option<&str> {
        self.command["execute"]
            .as_str()
            .or_else(|| self.command["exec-oob"].as_str())
    }
}

/// The exchanges not replayed yet.
struct ReplayState {
    exchanges: Vec<Option<Exchange>>,
    /// Just after the last exchange replayed.
    cursor: usize,
    end: Option<End>,
}

/// Finds the recorded exchange for `command` (same name and arguments if there is one, else
/// the first unused one of that name) and returns its messages as actions.
fn answer(state: &Mutex<ReplayState>, command: &Command) -> Vec<Action> {
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    let arguments = command
        .arguments
        .as_ref()
        .filter(|a| !a.is_empty())
        .map(|a| Value::Object(a.clone()));
    let same_name = |e: &Exchange| {
        e.name() == Some(command.execute.as_str())
            && e.command.get("exec-oob").is_some() == command.oob
    };
    let same_arguments = |e: &Exchange| {
        let recorded = e
            .command
            .get("arguments")
            .filter(|a| a.as_object().is_none_or(|o| !o.is_empty()));
        recorded == arguments.as_ref()
    };
    // In recorded order from the last exchange replayed, then from the start: a command sent
    // again later (query-status before negotiation, then after) takes its later recording.
    let order: Vec<usize> = (state.cursor..state.exchanges.len())
        .chain(0..state.cursor)
        .collect();
    let found = order
        .iter()
        .copied()
        .find(|&i| {
            state.exchanges[i]
                .as_ref()
                .is_some_and(|e| same_name(e) && same_arguments(e))
        })
        .or_else(|| {
            order
                .iter()
                .copied()
                .find(|&i| state.exchanges[i].as_ref().is_some_and(same_name))
        });
    let Some(index) = found else {
        return vec![Action::error(
            "GenericError",
            &format!("replay: no recorded exchange left for {}", command.execute),
        )];
    };
    let Some(exchange) = state.exchanges[index].take() else {
        return Vec::new();
    };
    state.cursor = index + 1;
    let recorded_id = exchange.command.get("id").cloned();
    let mut actions: Vec<Action> = exchange
        .answer
        .iter()
        .map(|m| Action::raw(swap_id(&m.text, recorded_id.as_ref(), command.id.as_ref())))
        .collect();
    // QEMU ended the session after the last recorded exchange (`quit`, or a guest's exit).
    if index + 1 == state.exchanges.len() && state.end.is_some() {
        actions.push(Action::Close);
    }
    actions
}

/// `text` with the recorded id (as QEMU printed it) replaced by the client's, or removed when
/// the client sent none.
fn swap_id(text: &str, recorded: Option<&Value>, client: Option<&Value>) -> String {
    let Some(recorded) = recorded else {
        return text.to_string();
    };
    let Ok(recorded) = qemu_json(recorded) else {
        return text.to_string();
    };
    let pattern = format!("\"id\": {recorded}");
    if !text.contains(&pattern) {
        return text.to_string();
    }
    match client.map(qemu_json) {
        Some(Ok(id)) => text.replacen(&pattern, &format!("\"id\": {id}"), 1),
        _ => text
            .replacen(&format!(", {pattern}"), "", 1)
            .replacen(&format!("{pattern}, "), "", 1),
    }
}

/// A JSON value printed the way QEMU prints it (`", "` and `": "` separators).
fn qemu_json(value: &Value) -> Result<String, serde_json::Error> {
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    serde::Serialize::serialize(value, &mut serializer)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// serde_json's compact output with QEMU's separators.
struct QemuFormatter;

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        comma_space(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        comma_space(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// QEMU's separator before every element but the first.
fn comma_space<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_are_swapped_where_qemu_put_them() {
        let recorded = json!("rec-3");
        assert_eq!(
            swap_id(
                "{\"return\": {}, \"id\": \"rec-3\"}\r\n",
                Some(&recorded),
                Some(&json!(7))
            ),
            "{\"return\": {}, \"id\": 7}\r\n"
        );
        assert_eq!(
            swap_id(
                "{\"id\": \"rec-3\", \"error\": {}}\r\n",
                Some(&recorded),
                Some(&json!({"a": [1, 2]}))
            ),
            "{\"id\": {\"a\": [1, 2]}, \"error\": {}}\r\n"
        );
        assert_eq!(
            swap_id(
                "{\"return\": {}, \"id\": \"rec-3\"}\r\n",
                Some(&recorded),
                None
            ),
            "{\"return\": {}}\r\n"
        );
        assert_eq!(
            swap_id("{\"id\": \"rec-3\", \"error\": {}}", Some(&recorded), None),
            "{\"error\": {}}"
        );
    }

    #[test]
    fn a_transcript_parses_and_splits_into_exchanges() {
        let text = concat!(
            r#"{"transcript": "t", "qemu": "9.9.9"}"#,
            "\n",
            r#"{"ms": 0.1, "from": "qemu", "text": "{\"QMP\": {}}\r\n"}"#,
            "\n",
            r#"{"ms": 0.2, "from": "client", "text": "{\"execute\":\"stop\",\"id\":\"rec-1\"}"}"#,
            "\n",
            r#"{"ms": 0.3, "from": "qemu", "text": "{\"event\": \"STOP\"}\r\n"}"#,
            "\n",
            r#"{"ms": 0.4, "from": "qemu", "text": "{\"return\": {}, \"id\": \"rec-1\"}\r\n"}"#,
            "\n",
            r#"{"ms": 0.5, "end": "eof", "exit": 0}"#,
            "\n"
        );
        let transcript = Transcript::parse(text).unwrap();
        assert_eq!(transcript.qemu, "9.9.9");
        assert_eq!(transcript.greeting(), Some("{\"QMP\": {}}\r\n"));
        let exchanges = transcript.exchanges();
        assert_eq!(exchanges.len(), 1);
        assert_eq!(exchanges[0].name(), Some("stop"));
        assert_eq!(exchanges[0].answer.len(), 2);
        assert_eq!(
            transcript.end,
            Some(End {
                at: Duration::from_micros(500),
                how: "eof".to_string(),
                exit: Some(0)
            })
        );
        assert!(Transcript::parse("").is_err());
        assert!(Transcript::parse("{\"transcript\": \"t\"}").is_err());
        let bad = "{\"transcript\": \"t\", \"qemu\": \"1\"}\n{\"ms\": 1, \"from\": \"x\", \"text\": \"\"}";
        assert!(Transcript::parse(bad).unwrap_err().contains("line 2"));
    }
}
