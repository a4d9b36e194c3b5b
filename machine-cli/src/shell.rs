//! `qemu-machine shell`: the interactive QMP shell (qmp-shell's language, see `lang`), also
//! used by `wrap` on a QEMU it launched.
//!
//! On a terminal, lines are read with rustyline: history in `~/.qemu-machine_history` (1024
//! entries, loaded at start and saved at exit), tab completion of command names from
//! `query-commands` (HMP mode: from `help`), Ctrl-C drops the current line or an open
//! transaction, Ctrl-D leaves. With stdin not a terminal, lines are read plainly and no prompt
//! is printed, so scripts get only replies and events on stdout.
//!
//! Events are shown as they arrive, not only on an empty line as qmp-shell does:
//! - `shell` on a terminal: a background thread waits for events on the shared connection
//!   (`qmp_client::Shared`) and prints each at once through rustyline's external printer, above
//!   the line being typed;
//! - `wrap` on a terminal: the same, on a shared handle of the launched machine's QMP
//!   connection (`Connection::share`);
//! - otherwise (piped stdin, or `--no-live-events`): the shell reads the
//!   events that have arrived before each prompt and right after each reply, and prints them
//!   then, before the reply when they came with it (so piped output has a stable order).
//!
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
use machine_core::qmp_proto::Event;
use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{CompletionType, Context, Editor, ExternalPrinter, Helper};
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

/// Why a QMP call of the shell gave no reply.
#[derive(Debug)]
pub enum MonitorError {
    /// The connection closed the expected way (after `quit`).
    Closed,
    /// The connection is gone.
    Lost(qmp_client::Error),
    /// This call failed (a timeout, a malformed reply); the connection carries on.
    Failed(Error),
}

impl MonitorError {
    /// Sorts a client error on `command` into closed, lost or failed.
    pub fn from_client(command: &str, error: qmp_client::Error) -> MonitorError {
        if error.is_closed() {
            MonitorError::Closed
        } else if connect::is_disconnect(&error) {
            MonitorError::Lost(error)
        } else {
            MonitorError::Failed(Error::from_qmp(command, error))
        }
    }
}

/// Waits up to the given time for one event: what the background event printer runs.
pub type EventPull =
    Box<dyn FnMut(Duration) -> std::result::Result<Option<Event>, qmp_client::Error> + Send>;

/// How long one wait of the background event printer lasts (it checks for shutdown between).
const EVENT_WAIT: Duration = Duration::from_millis(250);

/// Runs `shell ADDRESS`: connect, then [`run`].
/// Opens (creating it if needed) the `--logfile` for appending.
pub fn open_log(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| Error::LogFile {
            path: path.to_path_buf(),
            source,
        })
}

pub fn run_connected(args: ShellArgs) -> Result<u8> {
    // A bad --logfile is a usage error: say so before connecting.
    if let Some(path) = &args.shell.logfile {
        open_log(path)?;
    }
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
    let peer = address.to_string();
    let background = if !std::io::stdin().is_terminal() || args.no_live_events {
        None
    } else {
        Some(
            event_pull(&mut connection).map_err(|source| Error::Connect {
                address: peer.clone(),
                source,
            })?,
        )
    };
    let code = run(&mut connection, &args.shell, &banner, &peer, background)?;
    connect::close(connection);
    Ok(code)
}

/// Shares `connection` with a background event printer: the returned pull takes the events
/// from a shared handle while the shell keeps sending commands on `connection`.
pub fn event_pull(connection: &mut Connection) -> qmp_client::Result<EventPull> {
    let mut events = connection.share()?;
    Ok(Box::new(move |timeout| events.pull_event(timeout)))
}

/// Runs the shell on `connection` until EOF, `quit` or a disconnect. `banner` is shown on a
/// terminal; `peer` names the other end in messages.
///
/// With `background` (and stdin a terminal), a thread prints events as they arrive, pulling
/// them with it; the shell itself then leaves the events alone.
pub fn run(
    connection: &mut Connection,
    options: &ShellOptions,
    banner: &str,
    peer: &str,
    background: Option<EventPull>,
) -> Result<u8> {
    let interactive = std::io::stdin().is_terminal();
    let mut shell = Shell::new(connection, options, peer)?;
    let mut input = if interactive {
        output::emit(banner)?;
        output::emit("Press Ctrl-D to leave; Tab completes command names.")?;
        let names = shell.command_names();
        let mut input = Input::editor(names, options.history.clone())?;
        if let (Some(pull), Input::Editor { editor, .. }) = (background, &mut input) {
            // A terminal rustyline cannot drive (TERM=dumb...) has no external printer: the
            // events are then shown before each prompt and after each reply.
            match editor.create_external_printer() {
                Ok(printer) => {
                    spawn_event_printer(pull, printer, options.json, peer.to_string())?;
                    shell.events_elsewhere = true;
                }
                Err(error) => debug!("no background event printer: {error}"),
            }
        }
        input
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

/// Starts the thread that prints events as they arrive, above the line being typed. It ends
/// with the connection (a clean close says nothing; a lost connection is reported) or with
/// the process.
fn spawn_event_printer(
    mut pull: EventPull,
    mut printer: impl ExternalPrinter + Send + 'static,
    json: bool,
    peer: String,
) -> Result<()> {
    std::thread::Builder::new()
        .name("events".to_string())
        .spawn(move || loop {
            let text = match pull(EVENT_WAIT) {
                Ok(Some(event)) => events_cmd::view(&event).render(json),
                Ok(None) => continue,
                Err(qmp_client::Error::EventsLost { dropped, .. }) => {
                    format!("warning: {dropped} events were lost (queue full)")
                }
                Err(error) if error.is_closed() => return,
                Err(error) => {
                    let _ = printer.print(format!(
                        "qemu-machine: connection to {peer} lost: {error}\n"
                    ));
                    return;
                }
            };
            if printer.print(format!("{text}\n")).is_err() {
                return;
            }
        })
        .map(|_| ())
        .map_err(|source| Error::Io {
            what: "starting the event printer thread",
            source,
        })
}

/// How a line of the loop ended.
enum Flow {
    Continue,
    Exit,
}

struct Shell<'m> {
    qmp: &'m mut Connection,
    /// A background thread takes the events: the shell leaves them alone.
    events_elsewhere: bool,
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

impl<'m> Shell<'m> {
    fn new(qmp: &'m mut Connection, options: &ShellOptions, peer: &str) -> Result<Self> {
        let log = match &options.logfile {
            Some(path) => Some((path.clone(), open_log(path)?)),
            None => None,
        };
        Ok(Shell {
            qmp,
            events_elsewhere: false,
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
            if let Flow::Exit = self.print_events()? {
                return Ok(());
            }
            let line = match input.read(self.prompt())? {
                InputLine::Eof => return Ok(()),
                InputLine::Interrupted => {
                    if self.parser.cancel_transaction() {
                        output::note("transaction cancelled");
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
        if !line.trim().is_empty() {
            self.lines += 1;
        }
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
        if self.verbose {
            output::emit(&output::json(&request.to_value(), self.style))?;
        }
        let reply = self.request(&request);
        match reply {
            Ok(reply) => {
                // Events that came with the reply were received before it: show them first.
                if let Flow::Exit = self.print_events()? {
                    self.show_reply(&request, reply)?;
                    return Ok(Flow::Exit);
                }
                self.show_reply(&request, reply)?;
                Ok(Flow::Continue)
            }
            Err(failure) => self.monitor_failed(failure),
        }
    }

    /// Handles a failed monitor call: the end of the session, or one failed line.
    fn monitor_failed(&mut self, failure: MonitorError) -> Result<Flow> {
        match failure {
            MonitorError::Closed => {
                output::note(&format!(
                    "qemu-machine: {} closed the connection",
                    self.peer
                ));
                Ok(Flow::Exit)
            }
            MonitorError::Lost(source) => Err(Error::Disconnected {
                address: self.peer.clone(),
                source,
            }),
            MonitorError::Failed(error) => self.line_failed(&error),
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
        output::note(&message);
        Ok(Flow::Continue)
    }

    /// `cpu N` in HMP mode: check the index with a harmless command on that CPU, then keep it.
    fn select_cpu(&mut self, cpu: u64) -> Result<Flow> {
        let probe = lang::hmp_request("info version", Some(cpu));
        match self.request(&probe) {
            Ok(reply) => match reply_error(&reply) {
                None => {
                    self.cpu = Some(cpu);
                    Ok(Flow::Continue)
                }
                Some((class, desc)) => self.line_failed(&Error::Command {
                    command: format!("cpu {cpu}"),
                    class,
                    desc,
                }),
            },
            Err(failure) => self.monitor_failed(failure),
        }
    }

    fn show_reply(&mut self, request: &Request, mut reply: Value) -> Result<()> {
        if let Value::Object(object) = &mut reply {
            // The id is ours, chosen by the client; it means nothing to the user.
            object.remove("id");
        }
        self.log_exchange(request, &reply)?;
        let error = reply_error(&reply);
        if error.is_some() {
            self.failures += 1;
        }
        if self.hmp {
            if let Some((class, desc)) = error {
                return output::emit(&format!("{class}: {desc}"));
            }
            if let Some(Value::String(text)) = reply.get("return") {
                let text = text.trim_end();
                if text.is_empty() {
                    return Ok(());
                }
                return output::emit(text);
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

    /// Sends `request` and returns the whole reply object (`{"return": ...}` or
    /// `{"error": ...}`), QMP error replies included.
    fn request(&mut self, request: &Request) -> std::result::Result<Value, MonitorError> {
        self.qmp
            .execute_raw(&request.execute, request.arguments.clone())
            .map(|reply| reply.to_value())
            .map_err(|e| MonitorError::from_client(&request.execute, e))
    }

    /// The events received so far, oldest first, reading what has arrived without waiting
    /// (none when a background thread takes them).
    fn poll_events(&mut self) -> std::result::Result<Vec<Event>, MonitorError> {
        let mut events = Vec::new();
        if self.events_elsewhere {
            return Ok(events);
        }
        loop {
            match self.qmp.pull_event(Duration::ZERO) {
                Ok(Some(event)) => events.push(event),
                Ok(None) => return Ok(events),
                Err(qmp_client::Error::EventsLost { dropped, .. }) => {
                    output::note(&format!("warning: {dropped} events were lost (queue full)"));
                }
                // Events that came before the end are still shown.
                Err(_) if !events.is_empty() => return Ok(events),
                Err(e) => return Err(MonitorError::from_client("events", e)),
            }
        }
    }

    /// Prints the events that have arrived; `Flow::Exit` when the connection has closed
    /// after `quit`.
    fn print_events(&mut self) -> Result<Flow> {
        match self.poll_events() {
            Ok(events) => {
                for event in &events {
                    output::emit(&events_cmd::view(event).render(self.json_events))?;
                }
                Ok(Flow::Continue)
            }
            Err(MonitorError::Failed(error)) => self.line_failed(&error),
            Err(failure) => self.monitor_failed(failure),
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
        let mut names: Vec<String> = match self.request(&request) {
            Ok(reply) => match reply.get("return") {
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(|i| i.get("name").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect(),
                Some(Value::String(help)) => hmp_command_names(help),
                _ => Vec::new(),
            },
            Err(failure) => {
                debug!("no command names for completion: {failure:?}");
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

/// The class and description of an error reply, or None for any other reply.
fn reply_error(reply: &Value) -> Option<(String, String)> {
    let error = reply.get("error")?;
    let text = |key: &str| {
        error
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Some((text("class"), text("desc")))
}

/// The command names in HMP `help` output: the first word of each line, split at `|`
/// (`info|i`), without punctuation.
fn hmp_command_names(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|l| l.split_whitespace().next())
        .flat_map(|w| w.split('|'))
        .map(|w| w.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
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
            .map(|b| {
                b.auto_add_history(false)
                    .completion_type(CompletionType::List)
                    .build()
            })
            .map_err(|source| Error::Readline { source })?;
        let mut editor =
            Editor::with_config(config).map_err(|source| Error::Readline { source })?;
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
                output::note(&format!(
                    "warning: cannot save history to {}: {error}",
                    path.display()
                ));
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
        Err(error) => output::note(&format!(
            "warning: cannot load history from {}: {error}",
            path.display()
        )),
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
            (
                0,
                vec!["query-status".to_string(), "query-version".to_string()]
            )
        );
        assert_eq!(c.candidates("  qu", 4).0, 2);
        assert_eq!(c.candidates("  qu", 4).1.len(), 3);
        assert_eq!(c.candidates("quit x", 6), (6, Vec::new()));
        assert_eq!(c.candidates("zz", 2), (0, Vec::new()));
    }

    #[test]
    fn hmp_help_gives_command_names() {
        let help = "announce_self [interfaces] [id] -- Trigger GARP/RARP announcements\r\n\
                    info [subcommand] -- show various information\r\n\
                    q|quit  -- quit the emulator\r\n";
        assert_eq!(
            hmp_command_names(help),
            ["announce_self", "info", "q", "quit"]
        );
    }

    #[test]
    fn error_replies() {
        let reply = serde_json::json!({"error": {"class": "GenericError", "desc": "boom"}});
        assert_eq!(
            reply_error(&reply),
            Some(("GenericError".to_string(), "boom".to_string()))
        );
        assert_eq!(reply_error(&serde_json::json!({"return": {}})), None);
    }
}
