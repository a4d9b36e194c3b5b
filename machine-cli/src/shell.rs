//! `qemu-machine shell`: the interactive QMP shell (qmp-shell's language, see `lang`), also
//! used by `wrap` on a QEMU it launched.
//!
//! On a terminal, lines are read with rustyline: history in `~/.qemu-machine_history` (1024
//! entries, loaded at start and saved at exit), tab completion of command names from
//! `query-commands` (HMP mode: from `help`), Ctrl-C drops the current line or an open
//! transaction, Ctrl-D leaves. With stdin not a terminal, lines are read plainly and no prompt
//! is printed, so scripts get only replies and events on stdout.
//!
//! Events: the shell reads whatever events have arrived before each prompt and right after each
//! reply, and prints them then (before the reply when they came with it), not only on an empty
//! line as qmp-shell does. An event arriving while you type shows up at the next prompt.
//! A disconnect is reported (`qemu-machine: disconnected from ...`, exit status 3); after
//! `quit` the closed connection is the expected end and the shell exits with status 0.
//!
//! Exit status: 0, or 1 when any line failed (a parse error or a QMP error reply), so a script
//! piped into the shell can be checked.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::debug;
use machine_core::qmp_client::{self, Connection};
use machine_core::qmp_proto::{Event, ServerMessage};
use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};
use serde_json::{Map, Value};

use crate::address::Address;
use crate::args::{ShellArgs, ShellOptions};
use crate::connect::{self, ConnectOptions};
use crate::error::{Error, Result};
use crate::events_cmd;
use crate::lang::{self, HmpLine, QmpParser, Request};
use crate::output::{self, Style};

/// Most history entries kept (qmp-shell's figure).
const HISTORY_SIZE: usize = 1024;

/// What the shell talks to: a plain QMP connection (`shell`) or a launched machine (`wrap`).
pub trait Monitor {
    /// Sends `request` and returns the whole reply, QMP error replies included.
    fn request(&mut self, request: &Request) -> std::result::Result<ServerMessage, qmp_client::Error>;
    /// The events received so far, oldest first, reading what has arrived without waiting.
    fn poll_events(&mut self) -> std::result::Result<Vec<Event>, qmp_client::Error>;
}

impl Monitor for Connection {
    fn request(&mut self, request: &Request) -> std::result::Result<ServerMessage, qmp_client::Error> {
        self.execute_raw(&request.execute, request.arguments.clone())
    }

    fn poll_events(&mut self) -> std::result::Result<Vec<Event>, qmp_client::Error> {
        let mut events = Vec::new();
        while let Some(event) = self.pull_event(Duration::ZERO)? {
            events.push(event);
        }
        Ok(events)
    }
}

/// Runs `shell ADDRESS`: connect, then [`run`].
pub fn run_connected(args: ShellArgs) -> Result<u8> {
    let address = Address::parse(&args.address);
    let options = ConnectOptions {
        connect_timeout: args.connect_timeout,
        command_timeout: args.shell.timeout,
        skip_negotiation: args.skip_negotiation,
    };
    let mut connection = connect::connect(&address, &options)?;
    let banner = connection
        .greeting()
        .map(|g| {
            let v = &g.version.qemu;
            format!("Connected to QEMU {}.{}.{}", v.major, v.minor, v.micro)
        })
        .unwrap_or_else(|| format!("Connected to {address}"));
    let code = run(&mut connection, &args.shell, &banner, &address.to_string())?;
    connect::close(connection);
    Ok(code)
}

/// Runs the shell on `monitor` until EOF, `quit` or a disconnect. `banner` is shown on a
/// terminal; `peer` names the other end in messages.
pub fn run<M: Monitor>(monitor: &mut M, options: &ShellOptions, banner: &str, peer: &str) -> Result<u8> {
    let interactive = std::io::stdin().is_terminal();
    let mut shell = Shell::new(monitor, options, peer)?;
    let mut input = if interactive {
        println!("{banner}");
        println!("Press Ctrl-D to leave; Tab completes command names.");
        let names = shell.command_names();
        Input::editor(names, options.history.clone())?
    } else {
        Input::Piped(std::io::stdin().lock())
    };
    let outcome = shell.main_loop(&mut input);
    input.save_history();
    outcome?;
    if shell.failures > 0 {
        if interactive {
            return Ok(0);
        }
        return Err(Error::ShellFailures {
            failed: shell.failures,
            total: shell.lines,
        });
    }
    Ok(0)
}

/// How a line of the loop ended.
enum Flow {
    Continue,
    Exit,
}

struct Shell<'m, M: Monitor> {
    monitor: &'m mut M,
    peer: String,
    hmp: bool,
    verbose: bool,
    json_events: bool,
    style: Style,
    parser: QmpParser,
    cpu: Option<u64>,
    log: Option<(PathBuf, File)>,
    lines: u64,
    failures: u64,
}

impl<'m, M: Monitor> Shell<'m, M> {
    fn new(monitor: &'m mut M, options: &ShellOptions, peer: &str) -> Result<Self> {
        let log = match &options.logfile {
            Some(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| Error::File {
                        path: path.clone(),
                        source,
                    })?;
                Some((path.clone(), file))
            }
            None => None,
        };
        Ok(Shell {
            monitor,
            peer: peer.to_string(),
            hmp: options.hmp,
            verbose: options.verbose,
            json_events: options.json,
            style: if options.pretty {
                Style::Pretty
            } else {
                Style::Compact
            },
            parser: QmpParser::new(),
            cpu: None,
            log,
            lines: 0,
            failures: 0,
        })
    }

    fn prompt(&self) -> &'static str {
        if self.parser.in_transaction() {
            "TRANS> "
        } else if self.hmp {
            "(HMP) "
        } else {
            "(QEMU) "
        }
    }

    fn main_loop(&mut self, input: &mut Input) -> Result<()> {
        loop {
            self.print_events()?;
            let line = match input.read(self.prompt())? {
                InputLine::Eof => return Ok(()),
                InputLine::Interrupted => {
                    if self.parser.cancel_transaction() {
                        eprintln!("transaction cancelled");
                    }
                    continue;
                }
                InputLine::Text(line) => line,
            };
            if let Flow::Exit = self.handle_line(&line)? {
                return Ok(());
            }
        }
    }

    fn handle_line(&mut self, line: &str) -> Result<Flow> {
        let request = if self.hmp {
            match lang::parse_hmp_line(line) {
                Ok(HmpLine::Empty) => return Ok(Flow::Continue),
                Ok(HmpLine::SelectCpu(cpu)) => return self.select_cpu(cpu),
                Ok(HmpLine::Command(text)) => lang::hmp_request(&text, self.cpu),
                Err(error) => return self.line_failed(&error),
            }
        } else {
            match self.parser.parse_line(line) {
                Ok(Some(request)) => request,
                Ok(None) => return Ok(Flow::Continue),
                Err(error) => return self.line_failed(&error),
            }
        };
        self.lines += 1;
        if self.verbose {
            output::emit(&output::json(&request.to_value(), self.style))?;
        }
        let reply = self.monitor.request(&request);
        match reply {
            Ok(message) => {
                // Events that came with the reply were received before it: show them first.
                self.print_events()?;
                self.show_reply(&request, &message)?;
                Ok(Flow::Continue)
            }
            Err(error) if error.is_closed() => {
                eprintln!("qemu-machine: {} closed the connection", self.peer);
                Ok(Flow::Exit)
            }
            Err(error) if connect::is_disconnect(&error) => Err(Error::Disconnected {
                address: self.peer.clone(),
                source: error,
            }),
            Err(error) => {
                // A timeout or a malformed reply: the connection carries on.
                self.line_failed(&Error::from_qmp(&request.execute, error))
            }
        }
    }

    fn line_failed(&mut self, error: &Error) -> Result<Flow> {
        self.failures += 1;
        let mut message = format!("error: {error}");
        let mut cause = std::error::Error::source(error);
        while let Some(inner) = cause {
            message.push_str(&format!(": {inner}"));
            cause = inner.source();
        }
        eprintln!("{message}");
        Ok(Flow::Continue)
    }

    /// `cpu N` in HMP mode: check the index with a harmless command on that CPU, then keep it.
    fn select_cpu(&mut self, cpu: u64) -> Result<Flow> {
        let probe = lang::hmp_request("info version", Some(cpu));
        match self.monitor.request(&probe) {
            Ok(ServerMessage::Return(_)) => {
                self.cpu = Some(cpu);
                Ok(Flow::Continue)
            }
            Ok(ServerMessage::Error(reply)) => self.line_failed(&Error::Command {
                command: format!("cpu {cpu}"),
                class: reply.error.class.as_str().to_string(),
                desc: reply.error.desc,
            }),
            Ok(other) => {
                debug!("unexpected reply to a CPU probe: {:?}", other.to_value());
                Ok(Flow::Continue)
            }
            Err(error) if connect::is_disconnect(&error) => Err(Error::Disconnected {
                address: self.peer.clone(),
                source: error,
            }),
            Err(error) => self.line_failed(&Error::from_qmp("cpu", error)),
        }
    }

    fn show_reply(&mut self, request: &Request, message: &ServerMessage) -> Result<()> {
        let mut reply = message.to_value();
        if let Value::Object(object) = &mut reply {
            // The id is ours, chosen by the client; it means nothing to the user.
            object.remove("id");
        }
        self.log_exchange(request, &reply)?;
        if let ServerMessage::Error(_) = message {
            self.failures += 1;
        }
        if self.hmp {
            match message {
                ServerMessage::Return(r) => {
                    if let Value::String(text) = &r.ret {
                        let text = text.trim_end();
                        if !text.is_empty() {
                            output::emit(text)?;
                        }
                        return Ok(());
                    }
                }
                ServerMessage::Error(e) => {
                    output::emit(&format!("{}: {}", e.error.class.as_str(), e.error.desc))?;
                    return Ok(());
                }
                _ => {}
            }
        }
        output::emit(&output::json(&reply, self.style))
    }

    /// `-l FILE`: the command merged with its reply, one JSON object per line (as qmp-shell).
    fn log_exchange(&mut self, request: &Request, reply: &Value) -> Result<()> {
        let Some((path, file)) = &mut self.log else {
            return Ok(());
        };
        let mut entry = match request.to_value() {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        if let Value::Object(reply) = reply {
            entry.extend(reply.clone());
        }
        writeln!(file, "{}", Value::Object(entry))
            .and_then(|()| file.flush())
            .map_err(|source| Error::File {
                path: path.clone(),
                source,
            })
    }

    fn print_events(&mut self) -> Result<()> {
        match self.monitor.poll_events() {
            Ok(events) => {
                for event in &events {
                    output::emit(&events_cmd::view(event).render(self.json_events))?;
                }
                Ok(())
            }
            Err(qmp_client::Error::EventsLost { dropped, .. }) => {
                eprintln!("warning: {dropped} events were lost (queue full)");
                Ok(())
            }
            Err(error) if error.is_closed() => Err(Error::Disconnected {
                address: self.peer.clone(),
                source: error,
            }),
            Err(error) => Err(Error::Disconnected {
                address: self.peer.clone(),
                source: error,
            }),
        }
    }

    /// Names for tab completion: QMP commands from `query-commands`, or HMP commands from
    /// `help`. Failing to get them only means no completion.
    fn command_names(&mut self) -> Vec<String> {
        let request = if self.hmp {
            lang::hmp_request("help", None)
        } else {
            Request {
                execute: "query-commands".to_string(),
                arguments: None,
            }
        };
        let mut names: Vec<String> = match self.monitor.request(&request) {
            Ok(ServerMessage::Return(reply)) => match reply.ret {
                Value::Array(items) => items
                    .iter()
                    .filter_map(|i| i.get("name").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect(),
                Value::String(help) => help
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .flat_map(|w| w.split('|'))
                    .map(|w| w.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-'))
                    .filter(|w| !w.is_empty())
                    .map(str::to_string)
                    .collect(),
                _ => Vec::new(),
            },
            other => {
                debug!("no command names for completion: {other:?}");
                Vec::new()
            }
        };
        if self.hmp {
            names.push("cpu".to_string());
        } else {
            names.push("transaction(".to_string());
        }
        names.sort();
        names.dedup();
        names
    }
}

/// One read from the input.
enum InputLine {
    Text(String),
    Interrupted,
    Eof,
}

/// Where lines come from.
enum Input {
    Editor {
        editor: Box<Editor<Completion, DefaultHistory>>,
        history: Option<PathBuf>,
    },
    Piped(std::io::StdinLock<'static>),
}

impl Input {
    fn editor(names: Vec<String>, history: Option<PathBuf>) -> Result<Input> {
        let config = rustyline::Config::builder()
            .max_history_size(HISTORY_SIZE)
            .and_then(|b| b.history_ignore_dups(true))
            .map(|b| b.auto_add_history(false).build())
            .map_err(|source| Error::Readline { source })?;
        let mut editor = Editor::with_config(config).map_err(|source| Error::Readline { source })?;
        editor.set_helper(Some(Completion { names }));
        let history = history.or_else(default_history_path);
        if let Some(path) = &history {
            load_history(&mut editor, path);
        }
        Ok(Input::Editor {
            editor: Box::new(editor),
            history,
        })
    }

    fn read(&mut self, prompt: &str) -> Result<InputLine> {
        match self {
            Input::Editor { editor, .. } => match editor.readline(prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        // A history entry that cannot be added is not worth failing the line.
                        let _added = editor.add_history_entry(line.as_str());
                    }
                    Ok(InputLine::Text(line))
                }
                Err(ReadlineError::Interrupted) => Ok(InputLine::Interrupted),
                Err(ReadlineError::Eof) => Ok(InputLine::Eof),
                Err(source) => Err(Error::Readline { source }),
            },
            Input::Piped(stdin) => {
                let mut line = String::new();
                match stdin.read_line(&mut line) {
                    Ok(0) => Ok(InputLine::Eof),
                    Ok(_) => Ok(InputLine::Text(line)),
                    Err(source) => Err(Error::Io {
                        what: "reading stdin",
                        source,
                    }),
                }
            }
        }
    }

    fn save_history(&mut self) {
        if let Input::Editor {
            editor,
            history: Some(path),
        } = self
        {
            if let Err(error) = editor.save_history(path) {
                eprintln!("warning: cannot save history to {}: {error}", path.display());
            }
        }
    }
}

fn default_history_path() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| Path::new(&home).join(".qemu-machine_history"))
}

fn load_history(editor: &mut Editor<Completion, DefaultHistory>, path: &Path) {
    match editor.load_history(path) {
        Ok(()) => {}
        Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => eprintln!("warning: cannot load history from {}: {error}", path.display()),
    }
}

/// Tab completion of the first word of a line from a fixed list of names.
struct Completion {
    names: Vec<String>,
}

impl Completion {
    /// Where the word under the cursor starts and the names it may become; only the first
    /// word of a line is completed.
    fn candidates(&self, line: &str, pos: usize) -> (usize, Vec<String>) {
        let head = line.get(..pos).unwrap_or(line);
        let start = head.len() - head.trim_start().len();
        let word = &head[start..];
        if word.contains(char::is_whitespace) {
            return (pos, Vec::new());
        }
        let matches = self
            .names
            .iter()
            .filter(|n| n.starts_with(word))
            .cloned()
            .collect();
        (start, matches)
    }
}

impl Completer for Completion {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        Ok(self.candidates(line, pos))
    }
}

impl Hinter for Completion {
    type Hint = String;
}

impl Highlighter for Completion {}

impl Validator for Completion {}

impl Helper for Completion {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completes_the_first_word_only() {
        let c = Completion {
            names: vec![
                "query-status".to_string(),
                "query-version".to_string(),
                "quit".to_string(),
            ],
        };
        assert_eq!(
            c.candidates("query-", 6),
            (0, vec!["query-status".to_string(), "query-version".to_string()])
        );
        assert_eq!(c.candidates("  qu", 4).0, 2);
        assert_eq!(c.candidates("  qu", 4).1.len(), 3);
        assert_eq!(c.candidates("quit x", 6), (6, Vec::new()));
        assert_eq!(c.candidates("zz", 2), (0, Vec::new()));
    }
}
