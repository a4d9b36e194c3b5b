//! Fuzz target `session`: a script of server actions and client calls, read from the input,
//! runs against qmp-client's sans-IO `Session`.
//!
//! The server side writes greetings (good and malformed), replies to ids the client sent, to
//! timed-out ids, to ids it never sent or of another JSON type, id-less replies and errors,
//! events, raw garbage, EOF and socket errors; its bytes reach the session in chunks of the
//! input's choosing. The client sends commands (in-band, out-of-band, without id), abandons
//! them (as a timeout does), takes replies and events, writes its output out in pieces.
//!
//! Invariants: no panic (every error's `Display` included); bounded memory (in-flight counts
//! within their limits, the event queue within its capacity, the decoder's buffer within the
//! message limit plus the largest chunk fed); ids are never reused; a reply taken for an id
//! carries that id (or none, for the id-less command); once the session has failed, every
//! call fails at once; and at the end, after EOF, every request still held gets its outcome:
//! none stays pending.
#![no_main]

use std::collections::BTreeSet;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use qmp_client::MAX_IN_FLIGHT;
use qmp_client::{Config, Error, OobPolicy, OverflowPolicy, Phase, RequestId, Session};
use qmp_proto::{Command, EventFilter, ServerMessage};

/// What the server writes next.
#[derive(Arbitrary, Debug)]
enum Server {
    /// A greeting; `oob` offers the capability; `shape` 0-3 is valid, other values malformed.
    Greeting { oob: bool, shape: u8 },
    /// `{"return": ...}` to the id picked by `to`.
    Return { to: Target, big: bool },
    /// `{"error": {...}}` to the id picked by `to`.
    Error { to: Target },
    /// A message with an id but neither `return` nor `error` (a malformed reply).
    Malformed { to: Target },
    /// An event, with or without data.
    Event { name: u8, data: Option<u8> },
    /// Raw bytes as they are (garbage, partial messages, bad UTF-8, deep nesting...).
    Raw(Vec<u8>),
    /// CRLF, ending whatever partial line was written.
    Newline,
}

/// Which id a server message carries.
#[derive(Arbitrary, Debug)]
enum Target {
    /// The n-th id the client sent (modulo their number): pending, answered or timed out.
    Sent(u8),
    /// No `id` member.
    NoId,
    /// An id the client never sent.
    Unknown(u64),
    /// The n-th sent id as a JSON string (another type: an unknown id).
    AsString(u8),
    /// A negative or fractional number.
    Odd(i8),
}

/// One step of the script.
#[derive(Arbitrary, Debug)]
enum Step {
    /// The server writes a message into its outgoing bytes.
    Write(Server),
    /// Up to this many of the server's written bytes reach the session in one `feed`.
    Deliver(u16),
    /// The client sends a command (`kind` picks the name; `quit` among them).
    Send {
        kind: u8,
        oob: bool,
    },
    /// The client sends a command without an id.
    SendWithoutId {
        kind: u8,
    },
    /// The client gives up on the n-th sent id (its deadline passed).
    Abandon(u8),
    /// The client takes the outcome of the n-th sent id, if ready.
    TakeReply(u8),
    /// The client writes this many bytes of its pending output to the socket.
    Written(u16),
    PopEvent,
    DrainEvents,
    TakeMatching {
        name: u8,
    },
    TakeEventsLost,
    /// The server closes the connection (everything written is delivered first).
    Eof,
    /// The socket fails (`kind` picks reset, broken pipe or another error).
    IoError {
        kind: u8,
        read: bool,
    },
    /// The client closes the session.
    Close,
}

const NAMES: [&str; 6] = ["query-status", "stop", "cont", "quit", "query-block", "x"];
const EVENTS: [&str; 4] = ["STOP", "RESUME", "SHUTDOWN", "DEVICE_DELETED"];

/// Settings read from the first bytes: small limits the script can reach.
fn config(u: &mut Unstructured<'_>) -> arbitrary::Result<Config> {
    let capacity = u.int_in_range(1..=8usize)?;
    let overflow = if u.arbitrary()? {
        OverflowPolicy::DropOldest
    } else {
        OverflowPolicy::Error
    };
    let oob = if u.arbitrary()? {
        OobPolicy::Auto
    } else {
        OobPolicy::Off
    };
    let max_message = u.int_in_range(64..=4096usize)?;
    let await_greeting = u.ratio(7, 8)?;
    let negotiate = u.ratio(7, 8)?;
    Ok(Config::default()
        .with_event_queue(capacity, overflow)
        .with_oob(oob)
        .with_max_message_size(max_message)
        .with_await_greeting(await_greeting)
        .with_negotiate(negotiate)
        .with_max_oob_in_flight(u.int_in_range(1..=4usize)?))
}

/// The client's view: the ids it was given and the ones whose outcome it has taken.
struct Client {
    session: Session,
    config: Config,
    /// Every id handed out, in order (the id-less id 0 may repeat).
    sent: Vec<RequestId>,
    /// Ids whose outcome was taken or which were abandoned (no longer pending for the caller).
    done: BTreeSet<u64>,
    /// The server's bytes not yet delivered.
    wire: Vec<u8>,
    /// Largest chunk fed so far (the decoder's bound is the message limit plus this).
    largest_chunk: usize,
}

impl Client {
    fn pick(&self, n: u8) -> Option<RequestId> {
        if self.sent.is_empty() {
            None
        } else {
            Some(self.sent[n as usize % self.sent.len()])
        }
    }

    fn id_json(&self, target: &Target) -> Option<String> {
        match target {
            Target::Sent(n) => Some(self.pick(*n).map_or(1, RequestId::as_u64).to_string()),
            Target::NoId => None,
            Target::Unknown(n) => Some(n.to_string()),
            Target::AsString(n) => Some(format!(
                "\"{}\"",
                self.pick(*n).map_or(1, RequestId::as_u64)
            )),
            Target::Odd(n) => Some(format!("{}.5", n)),
        }
    }

    fn write(&mut self, message: &Server) {
        let with_id = |id: Option<String>, body: &str| match id {
            Some(id) => format!("{{{body}, \"id\": {id}}}\r\n"),
            None => format!("{{{body}}}\r\n"),
        };
        let text = match message {
            Server::Greeting { oob, shape } => {
                let caps = if *oob { "[\"oob\"]" } else { "[]" };
                let version = r#"{"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}"#;
                match shape {
                    0..=3 => format!(
                        "{{\"QMP\": {{\"version\": {version}, \"capabilities\": {caps}}}}}\r\n"
                    ),
                    4 => format!("{{\"QMP\": {{\"version\": 7, \"capabilities\": {caps}}}}}\r\n"),
                    5 => format!(
                        "{{\"QMP\": {{\"version\": {version}, \"capabilities\": \"oob\"}}}}\r\n"
                    ),
                    6 => "[\"QMP\"]\r\n".to_string(),
                    _ => "{\"QMP\": null}\r\n".to_string(),
                }
            }
            Server::Return { to, big } => {
                let value = if *big {
                    format!("\"{}\"", "r".repeat(300))
                } else {
                    "{}".to_string()
                };
                with_id(self.id_json(to), &format!("\"return\": {value}"))
            }
            Server::Error { to } => with_id(
                self.id_json(to),
                r#""error": {"class": "GenericError", "desc": "no"}"#,
            ),
            Server::Malformed { to } => with_id(self.id_json(to), r#""retrun": 1"#),
            Server::Event { name, data } => {
                let name = EVENTS[*name as usize % EVENTS.len()];
                let data = data.map_or(String::new(), |d| format!(", \"data\": {{\"n\": {d}}}"));
                format!(
                    "{{\"event\": \"{name}\"{data}, \"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}}}\r\n"
                )
            }
            Server::Raw(bytes) => {
                self.wire.extend_from_slice(bytes);
                return;
            }
            Server::Newline => "\r\n".to_string(),
        };
        self.wire.extend_from_slice(text.as_bytes());
    }

    fn deliver(&mut self, n: usize) {
        let n = n.min(self.wire.len());
        if n == 0 {
            return;
        }
        let chunk: Vec<u8> = self.wire.drain(..n).collect();
        self.largest_chunk = self.largest_chunk.max(chunk.len());
        self.session.feed(&chunk);
    }

    fn send(&mut self, result: Result<RequestId, Error>, idless: bool) {
        match result {
            Ok(id) => {
                if idless {
                    assert_eq!(id.as_u64(), 0, "an id-less command has id 0");
                    // Only one id-less command at a time: the previous one is over for us.
                    self.done.remove(&0);
                } else {
                    assert!(
                        self.sent.iter().all(|old| *old != id),
                        "id {id} handed out twice"
                    );
                }
                self.sent.push(id);
            }
            Err(err) => {
                let _ = err.to_string();
                if self.session.failure().is_some() {
                    assert!(
                        matches!(err, Error::Disconnected { .. }),
                        "a failed session must refuse with Disconnected, got {err:?}"
                    );
                }
            }
        }
    }

    fn take_reply(&mut self, id: RequestId) {
        let failed = self.session.failure().is_some();
        match self.session.take_reply(id) {
            None => {
                assert!(!failed, "a request of a failed session is still pending");
                assert!(!self.session.reply_ready(id));
            }
            Some(Ok(message)) => {
                self.done.insert(id.as_u64());
                match &message {
                    ServerMessage::Return(_) | ServerMessage::Error(_) => {}
                    other => panic!("a reply that is no reply: {other:?}"),
                }
                let carried = message.id().and_then(|v| v.as_u64());
                if id.as_u64() == 0 {
                    assert!(message.id().is_none(), "id-less got {message:?}");
                } else {
                    assert_eq!(carried, Some(id.as_u64()), "reply routed to the wrong id");
                }
            }
            Some(Err(err)) => {
                self.done.insert(id.as_u64());
                let _ = err.to_string();
            }
        }
    }

    /// The bounds that must hold after every step.
    fn check_bounds(&self) {
        let s = &self.session;
        assert!(
            s.in_flight() <= MAX_IN_FLIGHT,
            "{} in flight",
            s.in_flight()
        );
        assert!(s.oob_in_flight() <= self.config.max_oob_in_flight);
        assert!(s.queued_events() <= self.config.event_capacity);
        assert!(
            s.buffered_input() <= self.config.max_message_size + self.largest_chunk,
            "decoder holds {} bytes (limit {} + chunk {})",
            s.buffered_input(),
            self.config.max_message_size,
            self.largest_chunk
        );
        if let Some(failure) = s.failure() {
            let _ = failure.to_string();
            assert_eq!(s.phase(), Phase::Closed);
            assert!(!s.is_ready());
        }
    }
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    let config = config(&mut u)?;
    let mut c = Client {
        session: Session::new(&config),
        config,
        sent: Vec::new(),
        done: BTreeSet::new(),
        wire: Vec::new(),
        largest_chunk: 0,
    };
    let mut steps = 0;
    while !u.is_empty() && steps < 512 {
        steps += 1;
        let step: Step = u.arbitrary()?;
        match step {
            Step::Write(message) => c.write(&message),
            Step::Deliver(n) => c.deliver(n as usize),
            Step::Send { kind, oob } => {
                let name = NAMES[kind as usize % NAMES.len()];
                let result = c.session.send(Command::new(name).with_oob(oob));
                c.send(result, false);
            }
            Step::SendWithoutId { kind } => {
                let name = NAMES[kind as usize % NAMES.len()];
                let result = c.session.send_without_id(Command::new(name));
                c.send(result, true);
            }
            Step::Abandon(n) => {
                if let Some(id) = c.pick(n) {
                    c.session.abandon(id);
                    c.done.insert(id.as_u64());
                }
            }
            Step::TakeReply(n) => {
                if let Some(id) = c.pick(n) {
                    if !c.done.contains(&id.as_u64()) {
                        c.take_reply(id);
                    }
                }
            }
            Step::Written(n) => {
                let before = c.session.pending_output().len();
                c.session.consume_output(n as usize);
                let after = c.session.pending_output().len();
                assert_eq!(after, before.saturating_sub(n as usize));
                assert_eq!(c.session.wants_write(), after > 0);
            }
            Step::PopEvent => {
                let _ = c.session.pop_event();
            }
            Step::DrainEvents => {
                let before = c.session.queued_events();
                assert_eq!(c.session.drain_events().len(), before);
                assert_eq!(c.session.queued_events(), 0);
            }
            Step::TakeMatching { name } => {
                let name = EVENTS[name as usize % EVENTS.len()];
                let filter = EventFilter::new(name);
                if let Some(event) = c.session.take_matching_event(&[filter], 0) {
                    assert_eq!(event.event, name);
                }
            }
            Step::TakeEventsLost => {
                if let Some(err) = c.session.take_events_lost() {
                    assert!(matches!(err, Error::EventsLost { .. }));
                    assert!(c.session.take_events_lost().is_none(), "reported twice");
                }
            }
            Step::Eof => {
                let rest = c.wire.len();
                c.deliver(rest);
                c.session.feed_eof();
                assert!(c.session.failure().is_some(), "EOF must end the session");
            }
            Step::IoError { kind, read } => {
                let kind = match kind % 3 {
                    0 => std::io::ErrorKind::ConnectionReset,
                    1 => std::io::ErrorKind::BrokenPipe,
                    _ => std::io::ErrorKind::Other,
                };
                let op = if read { "read" } else { "write" };
                c.session.feed_io_error(op, std::io::Error::from(kind));
                assert!(
                    c.session.failure().is_some(),
                    "a socket error must end the session"
                );
            }
            Step::Close => {
                c.session.close();
                assert!(c.session.failure().is_some());
            }
        }
        c.check_bounds();
    }
    // The end: whatever the server wrote arrives, then EOF. Every request the client still
    // holds must now have its outcome, and new calls fail at once.
    let rest = c.wire.len();
    c.deliver(rest);
    c.session.feed_eof();
    c.check_bounds();
    let held: Vec<RequestId> = c
        .sent
        .iter()
        .copied()
        .filter(|id| !c.done.contains(&id.as_u64()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for id in held {
        match c.session.take_reply(id) {
            Some(outcome) => {
                if let Err(err) = outcome {
                    let _ = err.to_string();
                }
            }
            None => panic!("request {id} still pending after EOF"),
        }
    }
    match c.session.send(Command::new("query-status")) {
        Err(Error::Disconnected { .. }) => {}
        other => panic!("a send after EOF gave {other:?}"),
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
