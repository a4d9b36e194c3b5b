//! The sans-IO protocol state of one QMP connection: bytes in, bytes out, no sockets.
//!
//! [`Session`] knows the handshake phase, allocates ids, routes replies to their requests, keeps
//! the bounded event queue and the outgoing buffer. It never blocks and never touches a file
//! descriptor, so the blocking [`crate::Connection`], the thread-safe [`crate::Shared`] and a
//! caller's own event loop all drive the same state machine.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use qmp_proto::{Command, Decoder, DecoderConfig, Event, EventFilter, Greeting, ServerMessage};
use serde_json::Value;

use crate::config::{Config, OobPolicy, OverflowPolicy};
use crate::error::{Error, Result};

/// QMP's limit of in-band commands in flight (QEMU's `QMP_REQ_QUEUE_LEN_MAX`).
pub const MAX_IN_FLIGHT: usize = 8;

/// How many timed-out ids are remembered so that their late replies are recognised.
const TIMED_OUT_MEMORY: usize = 1024;

/// Longest excerpt of a bad message kept in an error.
const RAW_EXCERPT: usize = 512;

/// Where a session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Waiting for the server's greeting.
    Greeting,
    /// `qmp_capabilities` sent, waiting for its reply.
    Negotiation,
    /// Command mode: commands may be sent.
    Ready,
    /// The session is over (see [`Session::failure`]).
    Closed,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Greeting => "greeting",
            Phase::Negotiation => "negotiation",
            Phase::Ready => "command mode",
            Phase::Closed => "closed session",
        })
    }
}

/// The id of a command in flight: a small integer chosen by the client (fewest bytes on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

impl RequestId {
    /// The id of the (at most one) command sent without an id.
    const IDLESS: RequestId = RequestId(0);

    /// The number sent as the command's `id`; 0 for a command sent without an id.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

struct Pending {
    command: String,
    oob: bool,
    sent_at: Instant,
    reply: Option<Result<ServerMessage>>,
    /// Sent with [`Session::send_relayed`]: the reply goes to the relay queue.
    relayed: bool,
}

/// A message for a relay (a multiplexer sharing this session), in arrival order: see
/// [`Session::start_relay`].
#[derive(Debug, Clone, PartialEq)]
pub enum Relayed {
    /// An event (also queued for this session's own event waits as usual).
    Event(Event),
    /// The reply to a command sent with [`Session::send_relayed`], with the id it was sent
    /// under.
    Reply {
        /// The id returned by [`Session::send_relayed`].
        id: RequestId,
        /// The reply as the server sent it (`return`, `error` or an unknown shape).
        message: ServerMessage,
    },
}

struct TimedOut {
    command: String,
    oob: bool,
}

/// The protocol state of one QMP connection, independent of any I/O.
///
/// Contracts:
/// - Events are queued, never dropped silently and never taken as replies, whenever they arrive
///   (before the greeting, during negotiation, between a command and its reply). The queue is
///   bounded by [`Config::event_capacity`]; on overflow [`Config::overflow`] decides.
/// - Every command gets a fresh id (1, 2, 3...; never reused). Replies are matched by id; a reply
///   with an unknown id (e.g. late, after its command timed out) is dropped, logged at warn and
///   counted in [`Session::unknown_replies`].
/// - An `error` without an id while no id-less command is pending ends the session
///   ([`Error::ServerParse`]), as the QMP spec prescribes. While a timed-out id-less command's
///   reply is still due, the next id-less `return` or `error` is taken as that late reply and
///   dropped, and [`Session::send_without_id`] refuses new id-less commands.
/// - The first failure is sticky: afterwards every pending and new request fails at once with
///   [`Error::Disconnected`] carrying it. EOF (or ECONNRESET) after a `quit` we sent is a clean
///   close: the `quit` request completes with `{"return": {}}` and the cause is [`Error::Closed`].
pub struct Session {
    phase: Phase,
    negotiate: bool,
    negotiate_oob: OobPolicy,
    capacity: usize,
    overflow: OverflowPolicy,
    decoder: Decoder,
    out: Vec<u8>,
    out_start: usize,
    next_id: u64,
    pending: HashMap<RequestId, Pending>,
    timed_out: HashMap<RequestId, TimedOut>,
    inband: usize,
    /// Out-of-band commands in flight, timed-out ones included.
    oob: usize,
    /// Cap on `oob` ([`Config::max_oob_in_flight`]).
    max_oob: usize,
    events: VecDeque<(u64, Event)>,
    events_seen: u64,
    events_dropped: u64,
    events_lost_unreported: u64,
    unknown_replies: u64,
    greeting: Option<Greeting>,
    negotiation: Option<RequestId>,
    oob_enabled: bool,
    quit: Option<RequestId>,
    handshake_completed: bool,
    failure: Option<Arc<Error>>,
    /// Events and relayed replies in arrival order, once a relay started.
    relay: Option<VecDeque<Relayed>>,
    /// Called when the relay queue gains a message (see [`Session::set_relay_waker`]).
    relay_waker: Option<RelayWaker>,
    /// The `quit` was a relayed one (a multiplexer's client sent it), not ours.
    quit_relayed: bool,
    /// When the session was made (the greeting deadline counts from here).
    created: Instant,
    /// When the current phase began (the negotiation deadline counts from here).
    phase_since: Instant,
}

/// What [`Session::set_relay_waker`] takes: called from whichever thread feeds the session.
pub type RelayWaker = Box<dyn Fn() + Send>;

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("phase", &self.phase)
            .field("pending", &self.pending.len())
            .field("events", &self.events.len())
            .field("out", &(self.out.len() - self.out_start))
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session at the start of its handshake, as `config` describes it.
    ///
    /// With `await_greeting` false and `negotiate` true, `qmp_capabilities` is queued at once;
    /// with both false the session starts in command mode.
    pub fn new(config: &Config) -> Session {
        let decoder = Decoder::with_config(
            DecoderConfig::default().with_max_message_size(config.max_message_size),
        );
        let mut session = Session {
            phase: Phase::Greeting,
            negotiate: config.negotiate,
            negotiate_oob: config.oob,
            capacity: config.event_capacity.max(1),
            overflow: config.overflow,
            decoder,
            out: Vec::with_capacity(256),
            out_start: 0,
            next_id: 1,
            pending: HashMap::new(),
            timed_out: HashMap::new(),
            inband: 0,
            oob: 0,
            max_oob: config.max_oob_in_flight.max(1),
            events: VecDeque::new(),
            events_seen: 0,
            events_dropped: 0,
            events_lost_unreported: 0,
            unknown_replies: 0,
            greeting: None,
            negotiation: None,
            oob_enabled: false,
            quit: None,
            handshake_completed: false,
            failure: None,
            relay: None,
            relay_waker: None,
            quit_relayed: false,
            created: Instant::now(),
            phase_since: Instant::now(),
        };
        if !config.await_greeting {
            if config.negotiate {
                session.start_negotiation();
            } else {
                session.phase = Phase::Ready;
                session.handshake_completed = true;
            }
        }
        session
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When this session was made: the greeting deadline counts from here.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// When the current phase began (for [`Phase::Negotiation`]: when `qmp_capabilities` was
    /// queued, the start of its deadline).
    pub fn phase_since(&self) -> Instant {
        self.phase_since
    }

    /// Whether a `quit` was sent on this session (its reply may never come: QEMU exits).
    pub fn quit_sent(&self) -> bool {
        self.quit.is_some() && !self.quit_relayed
    }

    /// True once in command mode and not failed.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// True once the handshake finished (command mode was reached), even if the session failed
    /// afterwards: a server that negotiates and then closes at once (QEMU quitting right after
    /// its events) still completed the handshake, and its queued events stay readable.
    pub fn handshake_completed(&self) -> bool {
        self.handshake_completed
    }

    /// True while the handshake (greeting, negotiation) is still running.
    pub fn in_handshake(&self) -> bool {
        matches!(self.phase, Phase::Greeting | Phase::Negotiation)
    }

    /// The greeting, once received.
    pub fn greeting(&self) -> Option<&Greeting> {
        self.greeting.as_ref()
    }

    /// True when `oob` was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.oob_enabled
    }

    /// The failure that ended the session ([`Error::Closed`] for a clean close), if any.
    pub fn failure(&self) -> Option<&Arc<Error>> {
        self.failure.as_ref()
    }

    /// An [`Error::Disconnected`] carrying the sticky failure (or [`Error::Closed`]).
    pub fn disconnected(&self) -> Error {
        Error::Disconnected {
            cause: self
                .failure
                .clone()
                .unwrap_or_else(|| Arc::new(Error::Closed)),
        }
    }

    /// Takes the failure out of a session that is being discarded: the original error when no
    /// one else holds it, else a [`Error::Disconnected`] around it.
    pub fn into_failure(mut self) -> Error {
        match self.failure.take() {
            Some(cause) => {
                Arc::try_unwrap(cause).unwrap_or_else(|cause| Error::Disconnected { cause })
            }
            None => Error::Closed,
        }
    }

    /// True when an in-band (`oob` false) or out-of-band command may be sent now without
    /// exceeding [`MAX_IN_FLIGHT`] in-band commands, or [`Config::max_oob_in_flight`]
    /// out-of-band ones.
    pub fn has_slot(&self, oob: bool) -> bool {
        if oob {
            self.oob < self.max_oob
        } else {
            self.inband < MAX_IN_FLIGHT
        }
    }

    /// Frees the slot of a request that got its reply, ended with the session, or was
    /// forgotten.
    fn release(&mut self, oob: bool) {
        let count = if oob { &mut self.oob } else { &mut self.inband };
        *count = count.saturating_sub(1);
    }

    /// In-band commands in flight, including timed-out ones whose reply has not come yet (the
    /// server still holds them in its queue).
    pub fn in_flight(&self) -> usize {
        self.inband
    }

    /// Out-of-band commands in flight, including timed-out ones whose reply has not come yet.
    pub fn oob_in_flight(&self) -> usize {
        self.oob
    }

    /// The cap on out-of-band commands in flight ([`Config::max_oob_in_flight`]).
    pub fn max_oob_in_flight(&self) -> usize {
        self.max_oob
    }

    /// Queues `command` with a fresh id and returns it.
    ///
    /// Fails with [`Error::Disconnected`] after a failure, [`Error::NotReady`] during the
    /// handshake, [`Error::TooManyInFlight`] when 8 in-band commands (or, for an out-of-band
    /// one, [`Config::max_oob_in_flight`] out-of-band commands) are in flight, and with
    /// [`Error::CommandTooDeep`] when it nests deeper than QEMU accepts (nothing is sent).
    pub fn send(&mut self, command: Command) -> Result<RequestId> {
        self.check_can_send(&command)?;
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.enqueue(id, command.with_id(Value::from(id.0)));
        Ok(id)
    }

    /// Queues `command` without an id (at most one such command may be in flight; any id-less
    /// reply goes to it). Prefer [`Session::send`]: this exists for servers that reject ids.
    ///
    /// Fails with [`Error::IdlessBusy`] while another id-less command waits for its reply, or
    /// one timed out and its late reply has not come yet (it would be taken for this one's).
    /// That late reply, `error` included, is dropped and counted like any late reply.
    pub fn send_without_id(&mut self, mut command: Command) -> Result<RequestId> {
        self.check_can_send(&command)?;
        // A timed-out id-less command's reply may still come, and could not be told apart.
        if self.pending.contains_key(&RequestId::IDLESS)
            || self.timed_out.contains_key(&RequestId::IDLESS)
        {
            return Err(Error::IdlessBusy);
        }
        command.id = None;
        self.enqueue(RequestId::IDLESS, command);
        Ok(RequestId::IDLESS)
    }

    /// Starts the relay queue: from now on every event is also copied to it, and the replies
    /// of commands sent with [`Session::send_relayed`] go to it, all in the order they
    /// arrived ([`Session::take_relayed`]). A multiplexer uses it to share the session.
    pub fn start_relay(&mut self) {
        self.relay.get_or_insert_with(VecDeque::new);
    }

    /// Queues `command` like [`Session::send`], but its reply goes to the relay queue
    /// ([`Session::take_relayed`]) instead of [`Session::take_reply`]; its slot is freed when
    /// the reply arrives. Starts the relay if needed. After a `quit` sent this way, the clean
    /// close completes it with `{"return": {}}` like a `quit` of our own.
    pub fn send_relayed(&mut self, command: Command) -> Result<RequestId> {
        self.start_relay();
        let quit = command.execute == "quit";
        let id = self.send(command)?;
        if let Some(pending) = self.pending.get_mut(&id) {
            pending.relayed = true;
        }
        if quit {
            self.quit_relayed = true;
        }
        Ok(id)
    }

    /// Sets a function called each time a message joins the relay queue, from whichever thread
    /// feeds the session: a relay that waits in a poll of its own (while another thread reads
    /// the socket) wakes with it, for example through a `mio::Waker`.
    pub fn set_relay_waker(&mut self, waker: RelayWaker) {
        self.relay_waker = Some(waker);
    }

    /// Whether the relay queue holds messages (see [`Session::start_relay`]).
    pub fn has_relayed(&self) -> bool {
        self.relay.as_ref().is_some_and(|r| !r.is_empty())
    }

    /// The oldest message of the relay queue (see [`Session::start_relay`]).
    pub fn take_relayed(&mut self) -> Option<Relayed> {
        self.relay.as_mut()?.pop_front()
    }

    /// Appends the reply of a relayed command to the relay queue.
    fn relay_reply(&mut self, id: RequestId, message: ServerMessage) {
        self.relay_push(Relayed::Reply { id, message });
    }

    fn relay_push(&mut self, message: Relayed) {
        if let Some(relay) = &mut self.relay {
            relay.push_back(message);
            if let Some(wake) = &self.relay_waker {
                wake();
            }
        }
    }

    fn check_can_send(&self, command: &Command) -> Result<()> {
        check_nesting(command)?;
        if self.failure.is_some() {
            return Err(self.disconnected());
        }
        if self.phase != Phase::Ready {
            return Err(Error::NotReady { phase: self.phase });
        }
        if !self.has_slot(command.oob) {
            return Err(Error::TooManyInFlight {
                limit: if command.oob {
                    self.max_oob
                } else {
                    MAX_IN_FLIGHT
                },
            });
        }
        Ok(())
    }

    fn enqueue(&mut self, id: RequestId, command: Command) {
        let start = self.out.len();
        command.encode_into(&mut self.out);
        if log::log_enabled!(log::Level::Debug) {
            debug!("--> {}", String::from_utf8_lossy(&self.out[start..]));
        }
        if command.oob {
            self.oob += 1;
        } else {
            self.inband += 1;
        }
        if command.execute == "quit" {
            self.quit = Some(id);
        }
        self.pending.insert(
            id,
            Pending {
                command: command.execute,
                oob: command.oob,
                sent_at: Instant::now(),
                reply: None,
                relayed: false,
            },
        );
    }

    fn start_negotiation(&mut self) {
        let offered = self
            .greeting
            .as_ref()
            .is_some_and(|g| g.capabilities.iter().any(|c| c == "oob"));
        let enable_oob = offered && self.negotiate_oob == OobPolicy::Auto;
        let mut command = Command::new("qmp_capabilities");
        if enable_oob {
            let mut args = serde_json::Map::new();
            args.insert("enable".into(), Value::from(vec![Value::from("oob")]));
            command = command.with_arguments(args);
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.enqueue(id, command.with_id(Value::from(id.0)));
        self.phase = Phase::Negotiation;
        self.phase_since = Instant::now();
        self.negotiation = Some(id);
        self.oob_enabled = enable_oob;
    }

    /// The command name and age of a pending request.
    pub fn request_info(&self, id: RequestId) -> Option<(&str, Duration)> {
        self.pending
            .get(&id)
            .map(|p| (p.command.as_str(), p.sent_at.elapsed()))
    }

    /// True when the reply (or the session's failure) for `id` is available.
    pub fn reply_ready(&self, id: RequestId) -> bool {
        match self.pending.get(&id) {
            Some(p) => p.reply.is_some() || self.failure.is_some(),
            None => true,
        }
    }

    /// Takes the outcome of `id` when available: the reply message, [`Error::BadReply`] for a
    /// malformed one, [`Error::Disconnected`] when the session ended first. `None` while waiting.
    pub fn take_reply(&mut self, id: RequestId) -> Option<Result<ServerMessage>> {
        let ready = match self.pending.get(&id) {
            None => return Some(Err(Error::UnknownRequest { id: id.0 })),
            Some(p) => p.reply.is_some() || self.failure.is_some(),
        };
        if !ready {
            return None;
        }
        let pending = self.pending.remove(&id)?;
        match pending.reply {
            Some(reply) => Some(reply),
            None => {
                self.release(pending.oob);
                Some(Err(self.disconnected()))
            }
        }
    }

    /// Gives up on `id` (its deadline passed): a late reply will be dropped and counted.
    pub fn abandon(&mut self, id: RequestId) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        if pending.reply.is_some() || self.failure.is_some() {
            return;
        }
        if self.timed_out.len() >= TIMED_OUT_MEMORY {
            // Forget the oldest; if its reply ever comes it is still dropped, as unknown. The
            // id-less one is kept: forgetting it would let its late `error` end the session.
            let oldest = self
                .timed_out
                .keys()
                .filter(|id| **id != RequestId::IDLESS)
                .min()
                .copied();
            if let Some(oldest) = oldest {
                if let Some(t) = self.timed_out.remove(&oldest) {
                    self.release(t.oob);
                }
            }
        }
        self.timed_out.insert(
            id,
            TimedOut {
                command: pending.command,
                oob: pending.oob,
            },
        );
    }

    /// Bytes waiting to be written to the socket.
    pub fn pending_output(&self) -> &[u8] {
        &self.out[self.out_start..]
    }

    /// True when [`Session::pending_output`] is not empty.
    pub fn wants_write(&self) -> bool {
        self.out_start < self.out.len()
    }

    /// Marks `n` bytes of [`Session::pending_output`] as written.
    pub fn consume_output(&mut self, n: usize) {
        self.out_start = (self.out_start + n).min(self.out.len());
        if self.out_start == self.out.len() {
            self.out.clear();
            self.out_start = 0;
        }
    }

    /// Feeds bytes read from the socket and processes every complete message.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failure.is_some() {
            return;
        }
        log::trace!("read {} bytes", bytes.len());
        self.decoder.feed(bytes);
        while self.failure.is_none() {
            let next = if self.phase == Phase::Greeting {
                // Strict about the greeting's shape, which the lenient decoder would accept.
                self.decoder
                    .next_object()
                    .map(|r| r.and_then(check_greeting_shape))
            } else {
                self.decoder.next_message()
            };
            match next {
                None => break,
                Some(Ok(message)) => self.handle(message),
                Some(Err(err)) => self.decode_error(err),
            }
        }
    }

    /// Records that the server closed the connection.
    pub fn feed_eof(&mut self) {
        if self.failure.is_some() {
            return;
        }
        if self.quit.is_some() {
            self.close_after_quit();
            return;
        }
        let err = Error::Eof {
            phase: self.phase,
            partial_len: self.decoder.buffered_len(),
        };
        self.fail(err);
    }

    /// Records a socket error (`op` is `read` or `write`). ECONNRESET or EPIPE after our `quit`
    /// is a clean close.
    pub fn feed_io_error(&mut self, op: &'static str, err: io::Error) {
        if self.failure.is_some() {
            return;
        }
        if self.quit.is_some()
            && matches!(
                err.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            )
        {
            self.close_after_quit();
            return;
        }
        // A reset on the read side means the peer closed with bytes of ours unread (QEMU
        // exiting while our request was in flight): to the caller that is the same event as
        // EOF, with the phase it happened in.
        if op == "read" && err.kind() == io::ErrorKind::ConnectionReset {
            self.fail(Error::Eof {
                phase: self.phase,
                partial_len: self.decoder.buffered_len(),
            });
            return;
        }
        self.fail(Error::Io { op, source: err });
    }

    /// Records a failure found outside the protocol stream (the driving thread's poll failing)
    /// as the sticky failure; the first failure wins.
    pub(crate) fn fail_with(&mut self, err: Error) {
        self.fail(err);
    }

    /// Ends the session locally: pending and later calls get `Disconnected(Closed)`.
    pub fn close(&mut self) {
        if self.failure.is_none() {
            self.failure = Some(Arc::new(Error::Closed));
            self.phase = Phase::Closed;
        }
    }

    fn close_after_quit(&mut self) {
        if let Some(id) = self.quit {
            if let Some(p) = self.pending.get_mut(&id) {
                if p.reply.is_none() {
                    // The reply QEMU would have sent: with our id, or none for an id-less quit.
                    let reply = ServerMessage::Return(qmp_proto::ReturnReply {
                        ret: Value::Object(serde_json::Map::new()),
                        id: (id != RequestId::IDLESS).then(|| Value::from(id.0)),
                    });
                    if p.relayed {
                        self.pending.remove(&id);
                        self.relay_reply(id, reply);
                    } else {
                        p.reply = Some(Ok(reply));
                    }
                }
            }
        }
        debug!("connection closed after quit");
        self.close();
    }

    fn fail(&mut self, err: Error) {
        if self.failure.is_some() {
            return;
        }
        let err = match self.phase {
            Phase::Greeting => match err {
                Error::Decode { source } => Error::Greeting {
                    raw: excerpt(&source.to_string()),
                    source: Some(source),
                },
                other => other,
            },
            Phase::Negotiation => Error::Negotiation {
                cause: Box::new(err),
            },
            _ => err,
        };
        debug!("session failed: {err}");
        self.failure = Some(Arc::new(err));
        self.phase = Phase::Closed;
    }

    fn decode_error(&mut self, err: qmp_proto::Error) {
        self.fail(Error::Decode { source: err });
    }

    fn handle(&mut self, message: ServerMessage) {
        if log::log_enabled!(log::Level::Debug) {
            debug!("<-- {}", message.to_value());
        }
        match message {
            ServerMessage::Event(event) => self.push_event(event),
            ServerMessage::Greeting(greeting) => {
                if self.phase != Phase::Greeting {
                    warn!("unexpected second greeting ignored");
                    self.unknown_replies += 1;
                    return;
                }
                self.greeting = Some(greeting);
                if self.negotiate {
                    self.start_negotiation();
                } else {
                    self.phase = Phase::Ready;
                    self.handshake_completed = true;
                }
            }
            other if self.phase == Phase::Greeting => {
                self.fail(Error::Greeting {
                    raw: excerpt(&other.to_value().to_string()),
                    source: None,
                });
            }
            other => self.route(other),
        }
    }

    fn push_event(&mut self, event: Event) {
        if self.relay.is_some() {
            self.relay_push(Relayed::Event(event.clone()));
        }
        self.events_seen += 1;
        if self.events.len() >= self.capacity {
            self.events_dropped += 1;
            match self.overflow {
                OverflowPolicy::DropOldest => {
                    self.events.pop_front();
                }
                _ => {
                    self.events_lost_unreported += 1;
                    return;
                }
            }
        }
        self.events.push_back((self.events_seen - 1, event));
    }

    fn route(&mut self, message: ServerMessage) {
        let id = match message.id() {
            Some(value) => match value.as_u64() {
                Some(n) if n != 0 => Some(RequestId(n)),
                // An id we never send (wrong type, 0, negative...): unknown.
                _ => {
                    self.unknown(&message, "an id the client never sends");
                    return;
                }
            },
            None => None,
        };
        let Some(id) = id else {
            return self.route_idless(message);
        };
        if Some(id) == self.negotiation {
            return self.negotiated(id, message);
        }
        if let Some(p) = self.pending.get_mut(&id) {
            if p.relayed {
                let oob = p.oob;
                self.pending.remove(&id);
                self.release(oob);
                self.relay_reply(id, message);
                return;
            }
            if p.reply.is_none() {
                let outcome = reply_outcome(&p.command, message);
                p.reply = Some(outcome);
                let oob = p.oob;
                self.release(oob);
                return;
            }
            self.unknown(&message, "a duplicate reply");
            return;
        }
        if let Some(t) = self.timed_out.remove(&id) {
            self.release(t.oob);
            warn!("dropping late reply to timed-out `{}` (id {id})", t.command);
            self.unknown_replies += 1;
            return;
        }
        self.unknown(&message, "an unknown id");
    }

    fn route_idless(&mut self, message: ServerMessage) {
        if let Some(p) = self.pending.get_mut(&RequestId::IDLESS) {
            if p.reply.is_none() && !matches!(message, ServerMessage::Unknown(_)) {
                p.reply = Some(reply_outcome(&p.command, message));
                let oob = p.oob;
                self.release(oob);
                return;
            }
        }
        // The late reply of a timed-out id-less command: an `error` here is that
        // command's, not a server parse error, so it must not end the session.
        if matches!(message, ServerMessage::Return(_) | ServerMessage::Error(_)) {
            if let Some(t) = self.timed_out.remove(&RequestId::IDLESS) {
                self.release(t.oob);
                warn!("dropping late reply to timed-out id-less `{}`", t.command);
                self.unknown_replies += 1;
                return;
            }
        }
        match message {
            ServerMessage::Error(reply) => self.fail(Error::ServerParse {
                class: reply.error.class,
                desc: reply.error.desc,
            }),
            other => self.unknown(&other, "no id"),
        }
    }

    fn negotiated(&mut self, id: RequestId, message: ServerMessage) {
        let outcome = self
            .pending
            .remove(&id)
            .map(|p| reply_outcome(&p.command, message));
        self.inband = self.inband.saturating_sub(1);
        self.negotiation = None;
        match outcome {
            Some(Ok(ServerMessage::Return(_))) => {
                self.phase = Phase::Ready;
                self.handshake_completed = true;
                debug!("negotiated, oob {}", self.oob_enabled);
            }
            Some(Ok(ServerMessage::Error(reply))) => self.fail(Error::Command {
                command: "qmp_capabilities".into(),
                class: reply.error.class,
                desc: reply.error.desc,
            }),
            Some(Err(err)) => self.fail(err),
            Some(Ok(other)) => self.fail(Error::BadReply {
                command: "qmp_capabilities".into(),
                raw: excerpt(&other.to_value().to_string()),
            }),
            None => self.fail(Error::UnknownRequest { id: id.0 }),
        }
    }

    fn unknown(&mut self, message: &ServerMessage, why: &str) {
        self.unknown_replies += 1;
        warn!(
            "dropping reply with {why}: {}",
            excerpt(&message.to_value().to_string())
        );
    }

    /// Removes and returns the oldest queued event.
    pub fn pop_event(&mut self) -> Option<Event> {
        self.events.pop_front().map(|(_, e)| e)
    }

    /// Removes and returns every queued event, oldest first.
    pub fn drain_events(&mut self) -> Vec<Event> {
        self.events.drain(..).map(|(_, e)| e).collect()
    }

    /// Discards every queued event.
    pub fn clear_events(&mut self) {
        self.events.clear();
    }

    /// Number of queued events.
    pub fn queued_events(&self) -> usize {
        self.events.len()
    }

    /// Sequence number of the next event to arrive (events received so far, dropped included).
    pub fn event_seq(&self) -> u64 {
        self.events_seen
    }

    /// Removes and returns the oldest queued event matching any of `filters` (every event when
    /// `filters` is empty) that arrived at or after sequence number `since` (see
    /// [`Session::event_seq`]). Other events stay queued in order.
    pub fn take_matching_event(&mut self, filters: &[EventFilter], since: u64) -> Option<Event> {
        let pos = self.events.iter().position(|(seq, e)| {
            *seq >= since && (filters.is_empty() || filters.iter().any(|f| f.matches(e)))
        })?;
        self.events.remove(pos).map(|(_, e)| e)
    }

    /// Events discarded because the queue was full.
    pub fn events_dropped(&self) -> u64 {
        self.events_dropped
    }

    /// With [`OverflowPolicy::Error`]: an [`Error::EventsLost`] for events discarded since the
    /// last call, reported once.
    pub fn take_events_lost(&mut self) -> Option<Error> {
        if self.events_lost_unreported == 0 {
            return None;
        }
        let dropped = std::mem::take(&mut self.events_lost_unreported);
        Some(Error::EventsLost {
            dropped,
            capacity: self.capacity,
        })
    }

    /// Replies dropped because their id was unknown (late, duplicate, or never sent).
    pub fn unknown_replies(&self) -> u64 {
        self.unknown_replies
    }

    /// Bytes of an incomplete message buffered in the decoder.
    pub fn buffered_input(&self) -> usize {
        self.decoder.buffered_len()
    }
}

/// Classifies an object received while waiting for the greeting. A `QMP` member whose
/// `version` is not an object or whose `capabilities` is not an array is kept as
/// [`ServerMessage::Unknown`], which the greeting phase rejects.
/// Refuses a command nested deeper than QEMU's JSON parser accepts, before it is sent: QEMU
/// would answer with an error without an id and read what follows out of step. Every command
/// of this crate (QMP sessions and the guest agent) passes here.
pub(crate) fn check_nesting(command: &Command) -> Result<()> {
    let depth = command.nesting();
    if depth > qmp_proto::MAX_NESTING {
        return Err(Error::CommandTooDeep {
            command: command.execute.clone(),
            depth,
            limit: qmp_proto::MAX_NESTING,
        });
    }
    Ok(())
}

fn check_greeting_shape(
    object: serde_json::Map<String, Value>,
) -> std::result::Result<ServerMessage, qmp_proto::Error> {
    if let Some(inner) = object.get("QMP") {
        let valid = inner.get("version").is_some_and(Value::is_object)
            && inner.get("capabilities").is_some_and(Value::is_array);
        if !valid {
            return Ok(ServerMessage::Unknown(object));
        }
    }
    Ok(ServerMessage::from_object(object))
}

fn reply_outcome(command: &str, message: ServerMessage) -> Result<ServerMessage> {
    match message {
        ServerMessage::Return(_) | ServerMessage::Error(_) => Ok(message),
        other => Err(Error::BadReply {
            command: command.to_owned(),
            raw: excerpt(&other.to_value().to_string()),
        }),
    }
}

/// A bounded copy of `text` for error messages.
pub(crate) fn excerpt(text: &str) -> String {
    if text.len() <= RAW_EXCERPT {
        return text.to_owned();
    }
    let mut end = RAW_EXCERPT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GREETING: &[u8] =
        b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 0}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";

    fn out(s: &mut Session) -> String {
        let text = String::from_utf8(s.pending_output().to_vec()).unwrap();
        let n = s.pending_output().len();
        s.consume_output(n);
        text
    }

    fn ready() -> Session {
        let mut s = Session::new(&Config::default());
        s.feed(GREETING);
        assert_eq!(s.phase(), Phase::Negotiation);
        assert_eq!(
            out(&mut s),
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":1}"#
        );
        s.feed(b"{\"return\": {}, \"id\": 1}\r\n");
        assert!(s.is_ready());
        s
    }

    fn event(name: &str, i: u64) -> Vec<u8> {
        format!("{{\"event\": \"{name}\", \"data\": {{\"i\": {i}}}, \"timestamp\": {{\"seconds\": 1, \"microseconds\": 0}}}}\r\n").into_bytes()
    }

    #[test]
    fn commands_deeper_than_qemu_accepts_are_refused_and_nothing_is_queued() {
        let mut s = ready();
        // `a` is level 3 of the command: 1023 arrays make it 1025 levels deep.
        let mut value = Value::Array(Vec::new());
        for _ in 0..1022 {
            value = Value::Array(vec![value]);
        }
        let mut arguments = serde_json::Map::new();
        arguments.insert("a".into(), value);
        let command = Command::new("deep").with_arguments(arguments);
        for result in [
            s.send(command.clone()),
            s.send_without_id(command.clone()),
            s.send_relayed(command.clone().with_oob(true)),
        ] {
            match result {
                Err(Error::CommandTooDeep {
                    command,
                    depth: 1025,
                    limit: 1024,
                }) => assert_eq!(command, "deep"),
                other => panic!("{other:?}"),
            }
        }
        assert!(s.pending_output().is_empty());
        assert_eq!((s.in_flight(), s.oob_in_flight()), (0, 0));
        // One level less goes out.
        let Some(Value::Array(inner)) = command.arguments.as_ref().and_then(|a| a.get("a")) else {
            panic!("no array");
        };
        let mut shallower = serde_json::Map::new();
        shallower.insert("a".into(), inner[0].clone());
        assert!(s
            .send(Command::new("deep").with_arguments(shallower))
            .is_ok());
        assert!(!s.pending_output().is_empty());
    }

    #[test]
    fn ids_are_fresh_small_integers() {
        let mut s = ready();
        let a = s.send(Command::new("a")).unwrap();
        let b = s.send(Command::new("b").with_id("ignored")).unwrap();
        assert_eq!((a.as_u64(), b.as_u64()), (2, 3));
        assert_eq!(
            out(&mut s),
            r#"{"execute":"a","id":2}{"execute":"b","id":3}"#
        );
    }

    #[test]
    fn replies_are_routed_by_id_in_any_order() {
        let mut s = ready();
        let a = s.send(Command::new("a")).unwrap();
        let b = s.send(Command::new("b")).unwrap();
        assert!(s.take_reply(a).is_none());
        s.feed(b"{\"return\": \"B\", \"id\": 3}\r\n{\"return\": \"A\", \"id\": 2}\r\n");
        let ret = |m: ServerMessage| match m {
            ServerMessage::Return(r) => r.ret,
            other => panic!("{other:?}"),
        };
        assert_eq!(ret(s.take_reply(a).unwrap().unwrap()), "A");
        assert_eq!(ret(s.take_reply(b).unwrap().unwrap()), "B");
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn in_flight_limit_counts_inband_and_timed_out() {
        let mut s = ready();
        let ids: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|_| s.send(Command::new("x")).unwrap())
            .collect();
        assert!(matches!(
            s.send(Command::new("x")),
            Err(Error::TooManyInFlight { limit: 8 })
        ));
        assert!(s.send(Command::new("y").with_oob(true)).is_ok());
        s.abandon(ids[0]);
        assert!(
            !s.has_slot(false),
            "a timed-out command still occupies the server"
        );
        s.feed(b"{\"return\": {}, \"id\": 2}\r\n");
        assert!(s.has_slot(false));
        assert_eq!(s.unknown_replies(), 1);
    }

    #[test]
    fn events_are_queued_in_every_phase() {
        let mut s = Session::new(&Config::default());
        s.feed(&event("BEFORE", 0));
        s.feed(GREETING);
        s.feed(&event("DURING", 1));
        s.feed(b"{\"return\": {}, \"id\": 1}\r\n");
        let id = s.send(Command::new("c")).unwrap();
        s.feed(&event("AFTER", 2));
        s.feed(b"{\"return\": 5, \"id\": 2}\r\n");
        assert!(s.take_reply(id).unwrap().is_ok());
        let names: Vec<_> = s.drain_events().into_iter().map(|e| e.event).collect();
        assert_eq!(names, ["BEFORE", "DURING", "AFTER"]);
    }

    #[test]
    fn drop_oldest_is_bounded_and_counted() {
        let mut s =
            Session::new(&Config::default().with_event_queue(3, OverflowPolicy::DropOldest));
        for i in 0..10 {
            s.feed(&event("E", i));
        }
        assert_eq!(s.queued_events(), 3);
        assert_eq!(s.events_dropped(), 7);
        assert!(s.take_events_lost().is_none());
        assert_eq!(s.pop_event().unwrap().data.unwrap()["i"], 7);
    }

    #[test]
    fn matching_event_respects_sequence_and_keeps_order() {
        let mut s = ready();
        s.feed(&event("A", 0));
        let since = s.event_seq();
        s.feed(&event("B", 1));
        s.feed(&event("A", 2));
        let filters = [EventFilter::new("A")];
        let found = s.take_matching_event(&filters, since).unwrap();
        assert_eq!(found.data.unwrap()["i"], 2);
        let left: Vec<_> = s.drain_events().into_iter().map(|e| e.event).collect();
        assert_eq!(left, ["A", "B"]);
    }

    #[test]
    fn sticky_failure_after_eof() {
        let mut s = ready();
        let id = s.send(Command::new("c")).unwrap();
        s.feed(b"{\"return\"");
        s.feed_eof();
        match s.failure().map(|f| &**f) {
            Some(Error::Eof {
                phase: Phase::Ready,
                partial_len: 9,
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.take_reply(id),
            Some(Err(Error::Disconnected { .. }))
        ));
        assert!(matches!(
            s.send(Command::new("d")),
            Err(Error::Disconnected { .. })
        ));
    }

    #[test]
    fn quit_then_reset_is_clean_and_completes_quit() {
        let mut s = ready();
        let other = s.send(Command::new("other")).unwrap();
        let quit = s.send(Command::new("quit")).unwrap();
        s.feed_io_error("read", io::ErrorKind::ConnectionReset.into());
        assert!(matches!(
            s.take_reply(quit),
            Some(Ok(ServerMessage::Return(_)))
        ));
        match s.take_reply(other) {
            Some(Err(e)) => assert!(e.is_closed(), "{e:?}"),
            other => panic!("{other:?}"),
        }
    }

    /// Found by the `session` fuzz target: the reply completing an id-less `quit` at EOF
    /// carried `"id": 0`, an id the client never sends; QEMU's reply would carry none.
    #[test]
    fn idless_quit_then_eof_completes_without_an_id() {
        let mut s = ready();
        let quit = s.send_without_id(Command::new("quit")).unwrap();
        s.feed_eof();
        match s.take_reply(quit) {
            Some(Ok(reply @ ServerMessage::Return(_))) => assert_eq!(reply.id(), None),
            other => panic!("{other:?}"),
        }
        let quit = {
            let mut s = ready();
            let quit = s.send(Command::new("quit")).unwrap();
            s.feed_eof();
            s.take_reply(quit)
        };
        match quit {
            Some(Ok(reply @ ServerMessage::Return(_))) => {
                assert_eq!(reply.id(), Some(&Value::from(2)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reset_without_quit_is_an_eof_error() {
        let mut s = ready();
        s.feed_io_error("read", io::ErrorKind::ConnectionReset.into());
        assert!(matches!(
            s.failure().map(|f| &**f),
            Some(Error::Eof {
                phase: Phase::Ready,
                ..
            })
        ));
    }

    #[test]
    fn write_side_reset_without_quit_is_an_io_error() {
        let mut s = ready();
        s.feed_io_error("write", io::ErrorKind::BrokenPipe.into());
        assert!(matches!(
            s.failure().map(|f| &**f),
            Some(Error::Io { op: "write", .. })
        ));
    }

    #[test]
    fn greeting_shape_is_checked() {
        let mut s = Session::new(&Config::default());
        s.feed(b"{\"QMP\": {\"version\": {}, \"capabilities\": {}}}\r\n");
        assert!(matches!(
            s.failure().map(|f| &**f),
            Some(Error::Greeting { .. })
        ));
    }

    #[test]
    fn relay_keeps_qemus_order_and_wakes_its_waiter() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let mut s = ready();
        let wakes = Arc::new(AtomicUsize::new(0));
        let counter = wakes.clone();
        s.set_relay_waker(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        let relayed = s.send_relayed(Command::new("stop")).unwrap();
        let own = s.send(Command::new("query-status")).unwrap();
        s.feed(&event("STOP", 0));
        s.feed(b"{\"return\": {}, \"id\": 2}\r\n{\"return\": 1, \"id\": 3}\r\n");
        assert!(matches!(s.take_relayed(), Some(Relayed::Event(e)) if e.event == "STOP"));
        assert!(matches!(s.take_relayed(), Some(Relayed::Reply { id, .. }) if id == relayed));
        assert!(
            s.take_relayed().is_none(),
            "the owner's reply is not relayed"
        );
        assert!(s.take_reply(own).unwrap().is_ok());
        assert_eq!(
            s.pop_event().unwrap().event,
            "STOP",
            "the owner still gets the event"
        );
        assert_eq!(wakes.load(Ordering::SeqCst), 2);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn excerpt_is_bounded_on_char_boundaries() {
        let long = "é".repeat(1000);
        let e = excerpt(&long);
        assert!(e.len() < 600 && e.ends_with("(2000 bytes)"), "{e}");
    }
}
