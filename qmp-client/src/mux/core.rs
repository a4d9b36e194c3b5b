//! The sans-IO multiplexer: many QMP clients in, one upstream [`Session`] out, no sockets.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use log::{debug, info, warn};
use qmp_proto::{
    Command, Decoder, DecoderConfig, ErrorReply, Greeting, ReturnReply, ServerMessage,
};
use serde_json::{Map, Value};

use super::check::{self, Refusal};
use crate::session::{Relayed, RequestId, Session, MAX_IN_FLIGHT};

/// What a client's `quit` does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuitPolicy {
    /// Forward it: QEMU quits, and [`Mux::quit_by`] names the client.
    Allow,
    /// Answer it with a `GenericError` and leave QEMU running (the default: the owner decides
    /// when its QEMU ends).
    #[default]
    Refuse,
}

/// Settings of a [`Mux`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MuxConfig {
    /// Most bytes queued for one client. A client whose queue would grow past it (it stopped
    /// reading) is dropped with a warning. One message larger than the limit is still queued
    /// when the queue is empty, so memory per client stays below the limit or one message.
    /// Default 1 MiB.
    pub max_queued_bytes: usize,
    /// What a client's `quit` does. Default [`QuitPolicy::Refuse`].
    pub quit: QuitPolicy,
    /// Largest message accepted from a client, in bytes. Default 10 MiB.
    pub max_message_size: usize,
    /// Most clients at once; one more is greeted with an error and closed. Default 64.
    pub max_clients: usize,
}

impl Default for MuxConfig {
    fn default() -> MuxConfig {
        MuxConfig {
            max_queued_bytes: 1024 * 1024,
            quit: QuitPolicy::Refuse,
            max_message_size: DecoderConfig::DEFAULT_MAX_MESSAGE_SIZE,
            max_clients: 64,
        }
    }
}

impl MuxConfig {
    /// Sets [`MuxConfig::quit`].
    pub fn with_quit(mut self, quit: QuitPolicy) -> MuxConfig {
        self.quit = quit;
        self
    }

    /// Sets [`MuxConfig::max_queued_bytes`] (at least 1).
    pub fn with_max_queued_bytes(mut self, bytes: usize) -> MuxConfig {
        self.max_queued_bytes = bytes.max(1);
        self
    }

    /// Sets [`MuxConfig::max_clients`] (at least 1).
    pub fn with_max_clients(mut self, clients: usize) -> MuxConfig {
        self.max_clients = clients.max(1);
        self
    }
}

/// A client of a [`Mux`]; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(u64);

impl ClientId {
    /// The client's number (1, 2, 3... in the order they connected).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {}", self.0)
    }
}

/// Who a client is, for logs and reports: its number and a description of its peer (for
/// example `unix pid 4242 uid 1000` or `tcp 127.0.0.1:40122`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's id.
    pub id: ClientId,
    /// What is known about the peer.
    pub peer: String,
}

impl fmt::Display for ClientInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QMP client {} ({})", self.id.0, self.peer)
    }
}

/// Why a [`Mux`] dropped a client (see [`Mux::take_dropped`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// Its output queue would have passed [`MuxConfig::max_queued_bytes`]: it stopped reading.
    Overflow {
        /// Bytes that were queued.
        queued: usize,
        /// The limit.
        limit: usize,
    },
    /// QEMU's side ended; the client's queue was flushed first where it could be.
    UpstreamClosed,
    /// More clients than [`MuxConfig::max_clients`].
    TooManyClients,
}

/// Counters of a [`Mux`], and two gauges of what it holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MuxStats {
    /// Clients attached now (a gauge: refused and closing clients count until they are gone).
    pub clients: u64,
    /// Bytes held for the clients now (a gauge): output queues and input buffers, as
    /// allocated capacity ([`Mux::client_memory`] summed over the clients).
    pub buffered_bytes: u64,
    /// Clients ever added.
    pub clients_accepted: u64,
    /// Clients dropped because they stopped reading.
    pub clients_overflowed: u64,
    /// Commands forwarded to QEMU.
    pub commands_forwarded: u64,
    /// Commands answered by the multiplexer itself (negotiation, errors, refused `quit`).
    pub commands_answered: u64,
    /// Replies dropped because their client had gone.
    pub late_replies_dropped: u64,
    /// Events queued to clients (one per client per event).
    pub events_delivered: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Greeted, waiting for `qmp_capabilities`.
    Negotiating,
    /// Command mode; `oob` as the client negotiated.
    Ready { oob: bool },
}

struct Client {
    info: ClientInfo,
    state: State,
    decoder: Decoder,
    out: Vec<u8>,
    out_start: usize,
    /// In-band commands waiting for an upstream slot or for their reply.
    inband: usize,
    /// The multiplexer's own answers (to bad input, a refused `quit`) that must wait for the
    /// replies of in-band commands the client sent before: each with how many of those
    /// replies are still due (at least 1, never decreasing along the queue).
    deferred: VecDeque<(usize, Vec<u8>)>,
    /// Out-of-band commands waiting for an upstream slot or for their reply.
    oob: usize,
    /// Commands handed to QEMU whose replies have not come yet.
    forwarded: usize,
    /// The decoder may hold complete messages not taken yet (the client was at its limit).
    stalled: bool,
    /// The client closed its side: no more input, flush and go.
    eof: bool,
}

impl Client {
    fn queued(&self) -> usize {
        self.out.len() - self.out_start
    }

    /// Whether the next command may be taken: QEMU itself stops reading a monitor whose queue
    /// holds 8 in-band requests (bad ones included, as they are answered in turn), and so do
    /// we, per client.
    fn can_take(&self) -> bool {
        self.inband + self.deferred.len() < MAX_IN_FLIGHT && self.oob < MAX_OOB_PER_CLIENT
    }
}

/// Out-of-band commands one client may have waiting or in flight (QEMU sets no number; each
/// costs memory).
const MAX_OOB_PER_CLIENT: usize = 8;

/// A command taken from a client and not yet handed to QEMU.
struct Waiting {
    client: ClientId,
    command: Command,
    id: Option<Value>,
}

/// Where the reply of a forwarded command goes.
struct Route {
    client: ClientId,
    id: Option<Value>,
    oob: bool,
}

/// Shares one QMP session between many clients, each of which sees QEMU as if it were alone.
///
/// The core of the multiplexer, with no I/O: the owner feeds each client's bytes
/// ([`Mux::feed`]), writes out what [`Mux::output`] holds, and calls [`Mux::pump`] with the
/// upstream [`Session`] after that session processed input and after clients' input was fed.
/// A socket driver on a `mio::Poll` is that owner (see the `mux` module).
///
/// Contracts:
/// - **Greeting and negotiation.** A client first gets QEMU's own greeting (cached from the
///   upstream session; `oob` is offered only when the upstream session negotiated it) and must
///   negotiate with `qmp_capabilities` as with QEMU; until then every other command gets
///   QEMU's `CommandNotFound` reply and no events are sent to it.
/// - **Ids.** Commands are forwarded under fresh upstream ids, so clients can never collide with
///   each other or with the owner; a client's id, any JSON value or none, comes back exactly as
///   it sent it (a command without an id gets a reply without one, as from QEMU).
/// - **Order.** A client's in-band replies come in the order of its commands, the
///   multiplexer's own answers (to bad input, a refused `quit`) included, as from QEMU; events
///   and replies reach each client in the order QEMU sent them. At most 8 in-band requests per
///   client are taken at once (QEMU's own limit); further input waits in the client's socket.
/// - **Fairness.** When QEMU has room for another command, the client with the fewest
///   commands already with QEMU goes first (each client's own commands keep their order), so a
///   client with a deep queue delays the others by at most what it already has in QEMU.
/// - **The owner comes first.** The multiplexer leaves one in-band and one out-of-band slot of
///   the upstream session free for the session's owner, so clients can delay but never starve
///   its commands. Events still reach the owner's own event queue.
/// - **Isolation.** Bad input gets the reply QEMU would send, to that client only. A client
///   whose output queue passes [`MuxConfig::max_queued_bytes`] is dropped with a warning. A
///   client that leaves has its commands still waiting dropped, and the late replies of its
///   forwarded ones are dropped on arrival.
/// - **`quit`** follows [`MuxConfig::quit`]; when allowed, [`Mux::quit_by`] names the client.
/// - **`exec-oob`** is forwarded out of band for clients that negotiated `oob`.
pub struct Mux {
    config: MuxConfig,
    greeting: Vec<u8>,
    capabilities: Vec<String>,
    clients: HashMap<ClientId, Client>,
    next_client: u64,
    waiting: VecDeque<Waiting>,
    waiting_oob: VecDeque<Waiting>,
    routes: HashMap<RequestId, Route>,
    dropped: Vec<(ClientInfo, DropReason)>,
    quit_by: Option<ClientInfo>,
    upstream_closed: bool,
    stats: MuxStats,
}

impl fmt::Debug for Mux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mux")
            .field("clients", &self.clients.len())
            .field("waiting", &(self.waiting.len() + self.waiting_oob.len()))
            .field("forwarded", &self.routes.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Mux {
    /// A multiplexer for a session that has greeted us with `greeting` and negotiated (`oob`:
    /// whether out-of-band commands were enabled upstream). [`Mux::for_session`] takes both
    /// from the session.
    pub fn new(greeting: &Greeting, oob: bool, config: MuxConfig) -> Mux {
        let mut greeting = greeting.clone();
        if !oob {
            // Clients cannot get what the shared session did not negotiate.
            greeting.capabilities.retain(|c| c != "oob");
        }
        let mut bytes = Vec::with_capacity(160);
        ServerMessage::Greeting(greeting.clone()).encode_into(&mut bytes);
        Mux {
            config,
            greeting: bytes,
            capabilities: greeting.capabilities,
            clients: HashMap::new(),
            next_client: 1,
            waiting: VecDeque::new(),
            waiting_oob: VecDeque::new(),
            routes: HashMap::new(),
            dropped: Vec::new(),
            quit_by: None,
            upstream_closed: false,
            stats: MuxStats::default(),
        }
    }

    /// A multiplexer for `session`, which must have completed its handshake (`None` before);
    /// starts the session's relay queue.
    pub fn for_session(session: &mut Session, config: MuxConfig) -> Option<Mux> {
        if !session.handshake_completed() {
            return None;
        }
        let greeting = session.greeting().cloned().unwrap_or_default();
        session.start_relay();
        Some(Mux::new(&greeting, session.oob_enabled(), config))
    }

    /// The settings.
    pub fn config(&self) -> &MuxConfig {
        &self.config
    }

    /// Adds a client described by `peer` and queues the greeting for it. Past
    /// [`MuxConfig::max_clients`] the client gets an error instead and is dropped at once
    /// ([`Mux::take_dropped`]) once its output is written.
    pub fn add_client(&mut self, peer: impl Into<String>) -> ClientId {
        let id = ClientId(self.next_client);
        self.next_client += 1;
        self.stats.clients_accepted += 1;
        let info = ClientInfo {
            id,
            peer: peer.into(),
        };
        info!("{info} connected");
        let mut client = Client {
            info,
            state: State::Negotiating,
            decoder: Decoder::with_config(
                DecoderConfig::default().with_max_message_size(self.config.max_message_size),
            ),
            out: Vec::new(),
            out_start: 0,
            inband: 0,
            deferred: VecDeque::new(),
            oob: 0,
            forwarded: 0,
            stalled: false,
            eof: false,
        };
        if self.upstream_closed || self.clients.len() >= self.config.max_clients {
            let (desc, reason) = if self.upstream_closed {
                ("QEMU's monitor is closed", DropReason::UpstreamClosed)
            } else {
                (
                    "too many clients on this shared QMP monitor",
                    DropReason::TooManyClients,
                )
            };
            encode_refusal(&mut client.out, Refusal::generic(desc, None));
            client.eof = true;
            warn!("{}: refused: {desc}", client.info);
            self.dropped.push((client.info.clone(), reason));
        } else {
            client.out.extend_from_slice(&self.greeting);
        }
        self.clients.insert(id, client);
        id
    }

    /// Clients currently attached.
    pub fn clients(&self) -> impl Iterator<Item = &ClientInfo> {
        self.clients.values().map(|c| &c.info)
    }

    /// Number of clients currently attached.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Feeds bytes a client sent and handles every complete command it may take now.
    pub fn feed(&mut self, client: ClientId, bytes: &[u8]) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        if c.eof {
            return;
        }
        c.decoder.feed(bytes);
        c.stalled = true;
        self.take_input(client);
    }

    /// Whether `client` can take more input now (false while it has 8 in-band commands
    /// waiting or in flight, or input already buffered it cannot take yet: stop reading its
    /// socket, as QEMU does, until [`Mux::pump`] frees room).
    pub fn wants_input(&self, client: ClientId) -> bool {
        self.clients
            .get(&client)
            .is_some_and(|c| !c.eof && !c.stalled && c.can_take())
    }

    /// Records that `client` closed its side (or its socket failed): it is removed, its
    /// waiting commands are discarded and the late replies of its forwarded ones dropped.
    pub fn remove_client(&mut self, client: ClientId) {
        let Some(c) = self.clients.remove(&client) else {
            return;
        };
        let before = self.waiting.len() + self.waiting_oob.len();
        self.waiting.retain(|w| w.client != client);
        self.waiting_oob.retain(|w| w.client != client);
        let discarded = before - self.waiting.len() - self.waiting_oob.len();
        info!(
            "{} disconnected ({} commands in flight, {discarded} not sent)",
            c.info,
            (c.inband + c.oob).saturating_sub(discarded)
        );
    }

    /// Bytes waiting to be written to `client`.
    pub fn output(&self, client: ClientId) -> &[u8] {
        match self.clients.get(&client) {
            Some(c) => &c.out[c.out_start..],
            None => &[],
        }
    }

    /// Marks `n` bytes of [`Mux::output`] as written.
    pub fn consume_output(&mut self, client: ClientId, n: usize) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        c.out_start = (c.out_start + n).min(c.out.len());
        if c.out_start == c.out.len() {
            c.out.clear();
            c.out_start = 0;
            if c.out.capacity() > RETAINED_OUTPUT {
                c.out.shrink_to(RETAINED_OUTPUT);
            }
        } else if c.out_start >= c.out.len() / 2 {
            c.out.drain(..c.out_start);
            c.out_start = 0;
        }
    }

    /// Whether `client` should be closed once its output is written (it was refused, or
    /// QEMU's side ended).
    pub fn closing(&self, client: ClientId) -> bool {
        self.clients.get(&client).is_some_and(|c| c.eof)
    }

    /// Clients the multiplexer dropped since the last call, with why. An overflowed client is
    /// already removed (close its socket); a refused one, or one whose upstream ended, stays
    /// until its output is written ([`Mux::closing`]).
    pub fn take_dropped(&mut self) -> Vec<(ClientInfo, DropReason)> {
        std::mem::take(&mut self.dropped)
    }

    /// The client whose `quit` was forwarded, if any: the one that ended QEMU when QEMU then
    /// exited.
    pub fn quit_by(&self) -> Option<&ClientInfo> {
        self.quit_by.as_ref()
    }

    /// Whether the upstream session has ended.
    pub fn upstream_closed(&self) -> bool {
        self.upstream_closed
    }

    /// The counters, with the gauges as they are now.
    pub fn stats(&self) -> MuxStats {
        MuxStats {
            clients: self.clients.len() as u64,
            buffered_bytes: self
                .clients
                .keys()
                .map(|id| self.client_memory(*id) as u64)
                .sum(),
            ..self.stats
        }
    }

    /// Bytes held for `client`: its output queue and its decoder's buffer (allocated
    /// capacity), for memory accounting.
    pub fn client_memory(&self, client: ClientId) -> usize {
        self.clients.get(&client).map_or(0, |c| {
            c.out.capacity()
                + c.decoder.buffer_capacity()
                + c.deferred.iter().map(|(_, b)| b.capacity()).sum::<usize>()
        })
    }

    /// Moves messages between the clients and `upstream`: relays QEMU's events and replies (in
    /// the order QEMU sent them) to the clients, hands waiting commands to the session while
    /// it has slots to spare, and takes more client input where there is room. Call it after
    /// the session processed input and after clients' input was fed; then write the session's
    /// and the clients' output.
    pub fn pump(&mut self, upstream: &mut Session) {
        loop {
            while let Some(message) = upstream.take_relayed() {
                match message {
                    Relayed::Event(event) => {
                        let mut bytes = Vec::with_capacity(128);
                        ServerMessage::Event(event).encode_into(&mut bytes);
                        self.fan_out(&bytes);
                    }
                    Relayed::Reply { id, message } => self.route_reply(id, message),
                }
            }
            if upstream.failure().is_some() {
                self.close_upstream();
                return;
            }
            let forwarded = self.forward(upstream);
            let took = self.take_stalled();
            if !forwarded && !took {
                return;
            }
        }
    }

    /// Takes input from clients that were waiting for room; true when any was taken.
    fn take_stalled(&mut self) -> bool {
        let ready: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.stalled && c.can_take())
            .map(|(id, _)| *id)
            .collect();
        let mut took = false;
        for id in ready {
            let before = self.waiting.len() + self.waiting_oob.len();
            self.take_input(id);
            took |= self.waiting.len() + self.waiting_oob.len() != before;
        }
        took
    }

    /// Hands waiting commands to the session while it has a slot beyond the owner's reserve.
    /// True when any was sent.
    fn forward(&mut self, upstream: &mut Session) -> bool {
        let mut any = false;
        for oob in [true, false] {
            loop {
                if !has_spare_slot(upstream, oob) {
                    break;
                }
                let queue = if oob {
                    &mut self.waiting_oob
                } else {
                    &mut self.waiting
                };
                let Some(next) = next_waiting(queue, &self.clients) else {
                    break;
                };
                let Some(w) = queue.remove(next) else { break };
                let name = w.command.execute.clone();
                match upstream.send_relayed(w.command) {
                    Ok(request) => {
                        any = true;
                        self.stats.commands_forwarded += 1;
                        if let Some(c) = self.clients.get_mut(&w.client) {
                            c.forwarded += 1;
                        }
                        if name == "quit" {
                            if let Some(c) = self.clients.get(&w.client) {
                                info!("{} sent quit: QEMU is asked to exit", c.info);
                                self.quit_by = Some(c.info.clone());
                            }
                        }
                        self.routes.insert(
                            request,
                            Route {
                                client: w.client,
                                id: w.id,
                                oob,
                            },
                        );
                    }
                    Err(e) => {
                        // Only a failed session refuses a command that has a slot: the next
                        // pump closes every client.
                        debug!("cannot forward `{name}`: {e}");
                        if oob {
                            if let Some(c) = self.clients.get_mut(&w.client) {
                                c.oob = c.oob.saturating_sub(1);
                            }
                        } else {
                            self.inband_done(w.client);
                        }
                        return any;
                    }
                }
            }
        }
        any
    }

    fn route_reply(&mut self, request: RequestId, message: ServerMessage) {
        let Some(route) = self.routes.remove(&request) else {
            warn!("dropping relayed reply with no route (upstream id {request})");
            return;
        };
        let Some(client) = self.clients.get_mut(&route.client) else {
            self.stats.late_replies_dropped += 1;
            debug!(
                "dropping the late reply of client {} (gone)",
                route.client.0
            );
            return;
        };
        client.forwarded = client.forwarded.saturating_sub(1);
        if route.oob {
            client.oob = client.oob.saturating_sub(1);
        }
        let message = with_id(message, route.id);
        let mut bytes = Vec::with_capacity(128);
        message.encode_into(&mut bytes);
        if self.queue_to(route.client, &bytes) && !route.oob {
            self.inband_done(route.client);
        }
    }

    /// One in-band command of `client` is answered (or will never be): its answers that were
    /// waiting only for that one go out now.
    fn inband_done(&mut self, client: ClientId) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        c.inband = c.inband.saturating_sub(1);
        for (due, _) in c.deferred.iter_mut() {
            *due = due.saturating_sub(1);
        }
        let mut ready = Vec::new();
        while c.deferred.front().is_some_and(|(due, _)| *due == 0) {
            ready.extend(c.deferred.pop_front().map(|(_, bytes)| bytes));
        }
        for bytes in ready {
            if !self.queue_to(client, &bytes) {
                return;
            }
        }
    }

    fn fan_out(&mut self, bytes: &[u8]) {
        let ready: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Ready { .. }) && !c.eof)
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            if self.queue_to(id, bytes) {
                self.stats.events_delivered += 1;
            }
        }
    }

    /// Appends `bytes` to a client's queue, or drops the client when that would overflow it.
    /// True when queued.
    fn queue_to(&mut self, client: ClientId, bytes: &[u8]) -> bool {
        let limit = self.config.max_queued_bytes;
        let Some(c) = self.clients.get_mut(&client) else {
            return false;
        };
        let queued = c.queued();
        if queued > 0 && queued + bytes.len() > limit {
            let info = c.info.clone();
            warn!(
                "dropping {info}: it stopped reading ({queued} bytes queued, the limit is {limit})"
            );
            self.stats.clients_overflowed += 1;
            self.remove_client(client);
            self.dropped
                .push((info, DropReason::Overflow { queued, limit }));
            return false;
        }
        c.out.extend_from_slice(bytes);
        true
    }

    /// Takes complete messages from a client's decoder while it has room.
    fn take_input(&mut self, client: ClientId) {
        loop {
            let Some(c) = self.clients.get_mut(&client) else {
                return;
            };
            if c.eof {
                return;
            }
            if !c.can_take() {
                c.stalled = true;
                return;
            }
            let Some(item) = c.decoder.next_object() else {
                c.stalled = false;
                return;
            };
            match item {
                Ok(object) => self.handle_object(client, object),
                Err(e) => {
                    debug!("{}: bad input: {e}", c.info);
                    self.answer(client, check::decode_refusal(&e));
                }
            }
        }
    }

    fn handle_object(&mut self, client: ClientId, object: Map<String, Value>) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        let oob = matches!(c.state, State::Ready { oob: true });
        let (command, id) = match check::check_command(object, oob) {
            Ok(checked) => checked,
            Err(refusal) => return self.answer(client, refusal),
        };
        if log::log_enabled!(log::Level::Debug) {
            debug!("{} --> {}", c.info, command.execute);
        }
        match c.state {
            State::Negotiating => {
                if command.execute != "qmp_capabilities" {
                    return self
                        .answer(client, Refusal::not_found(check::EXPECTING_NEGOTIATION, id));
                }
                match check::check_capabilities(&command, &id, &self.capabilities) {
                    Ok(oob) => {
                        c.state = State::Ready { oob };
                        debug!("{} negotiated, oob {oob}", c.info);
                        self.stats.commands_answered += 1;
                        let reply = ServerMessage::Return(ReturnReply {
                            ret: Value::Object(Map::new()),
                            id,
                        });
                        let mut bytes = Vec::with_capacity(32);
                        reply.encode_into(&mut bytes);
                        self.queue_to(client, &bytes);
                    }
                    Err(refusal) => self.answer(client, refusal),
                }
            }
            State::Ready { .. } => {
                if command.execute == "quit" && self.config.quit == QuitPolicy::Refuse {
                    info!("{} sent quit: refused by the owner's policy", c.info);
                    return self.answer(client, Refusal::generic(QUIT_REFUSED, id));
                }
                if command.oob {
                    c.oob += 1;
                    self.waiting_oob.push_back(Waiting {
                        client,
                        command,
                        id,
                    });
                } else {
                    c.inband += 1;
                    self.waiting.push_back(Waiting {
                        client,
                        command,
                        id,
                    });
                }
            }
        }
    }

    fn answer(&mut self, client: ClientId, refusal: Refusal) {
        self.stats.commands_answered += 1;
        let mut bytes = Vec::with_capacity(96);
        encode_refusal(&mut bytes, refusal);
        if let Some(c) = self.clients.get_mut(&client) {
            // QEMU answers requests in turn: after the replies to earlier in-band commands.
            if c.inband > 0 {
                c.deferred.push_back((c.inband, bytes));
                return;
            }
        }
        self.queue_to(client, &bytes);
    }

    fn close_upstream(&mut self) {
        if self.upstream_closed {
            return;
        }
        self.upstream_closed = true;
        self.waiting.clear();
        self.waiting_oob.clear();
        self.routes.clear();
        for c in self.clients.values_mut() {
            // The replies they waited for will never come: what the client is owed goes now.
            for (_, bytes) in c.deferred.drain(..) {
                c.out.extend_from_slice(&bytes);
            }
            c.eof = true;
            self.dropped
                .push((c.info.clone(), DropReason::UpstreamClosed));
        }
        info!(
            "QEMU's monitor closed: closing {} shared clients",
            self.clients.len()
        );
    }
}

/// The description of the error a refused `quit` gets.
pub(crate) const QUIT_REFUSED: &str =
    "quit is refused: this QEMU is shared, and its owner decides when it ends";

/// Capacity an empty output queue keeps.
const RETAINED_OUTPUT: usize = 64 * 1024;

/// Which waiting command goes to QEMU next: each client's oldest waiting command is a
/// candidate (a client's commands go out in its order), and the one whose client has the
/// fewest commands already with QEMU wins, the earliest on a tie. QEMU answers a monitor's
/// requests in turn, so every command handed over makes the later ones wait: first come,
/// first served would let one client with a deep queue keep all the others behind it.
fn next_waiting(queue: &VecDeque<Waiting>, clients: &HashMap<ClientId, Client>) -> Option<usize> {
    let mut seen: Vec<ClientId> = Vec::new();
    let mut best: Option<(usize, usize)> = None;
    for (i, w) in queue.iter().enumerate() {
        if seen.contains(&w.client) {
            continue;
        }
        seen.push(w.client);
        let load = clients.get(&w.client).map_or(0, |c| c.forwarded);
        if best.is_none_or(|(least, _)| load < least) {
            best = Some((load, i));
        }
    }
    best.map(|(_, i)| i)
}

/// Whether the session has a slot for the multiplexer, one being left to the owner.
fn has_spare_slot(upstream: &Session, oob: bool) -> bool {
    if oob {
        upstream.oob_in_flight() + 1 < upstream.max_oob_in_flight()
    } else {
        upstream.in_flight() + 1 < MAX_IN_FLIGHT
    }
}

fn encode_refusal(out: &mut Vec<u8>, refusal: Refusal) {
    ServerMessage::Error(ErrorReply {
        error: refusal.error,
        id: refusal.id,
    })
    .encode_into(out);
}

/// The reply with the client's id in place of the upstream one (none when the client sent
/// none).
fn with_id(message: ServerMessage, id: Option<Value>) -> ServerMessage {
    match message {
        ServerMessage::Return(mut reply) => {
            reply.id = id;
            ServerMessage::Return(reply)
        }
        ServerMessage::Error(mut reply) => {
            reply.id = id;
            ServerMessage::Error(reply)
        }
        ServerMessage::Unknown(mut object) => {
            match id {
                Some(id) => object.insert("id".to_owned(), id),
                None => object.remove("id"),
            };
            ServerMessage::Unknown(object)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::json;

    const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian\"}, \"capabilities\": [\"oob\"]}}\r\n";

    /// An upstream session in command mode with `oob` negotiated, its output consumed.
    fn upstream() -> Session {
        let mut s = Session::new(&Config::default());
        s.feed(GREETING);
        upstream_output(&mut s);
        s.feed(b"{\"return\": {}, \"id\": 1}\r\n");
        assert!(s.is_ready());
        s
    }

    /// Takes what the session would write to QEMU, as commands.
    fn upstream_output(s: &mut Session) -> Vec<Command> {
        let n = s.pending_output().len();
        let mut decoder = Decoder::new();
        decoder.feed(s.pending_output());
        s.consume_output(n);
        let mut out = Vec::new();
        while let Some(object) = decoder.next_object() {
            out.push(Command::from_object(object.unwrap()).unwrap());
        }
        out
    }

    /// Takes what a client would read, as messages.
    fn client_output(mux: &mut Mux, client: ClientId) -> Vec<ServerMessage> {
        let bytes = mux.output(client).to_vec();
        mux.consume_output(client, bytes.len());
        let mut decoder = Decoder::new();
        decoder.feed(&bytes);
        let mut out = Vec::new();
        while let Some(message) = decoder.next_message() {
            out.push(message.unwrap());
        }
        out
    }

    fn setup(config: MuxConfig) -> (Session, Mux) {
        let mut s = upstream();
        let mux = Mux::for_session(&mut s, config).unwrap();
        (s, mux)
    }

    /// A client that has read its greeting and negotiated (`oob` if asked).
    fn negotiated(mux: &mut Mux, oob: bool) -> ClientId {
        let c = mux.add_client("test");
        let greeting = client_output(mux, c);
        assert!(matches!(greeting[..], [ServerMessage::Greeting(_)]));
        let caps: &[u8] = if oob {
            br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#
        } else {
            br#"{"execute":"qmp_capabilities"}"#
        };
        mux.feed(c, caps);
        assert_eq!(
            client_output(mux, c),
            [ServerMessage::Return(ReturnReply {
                ret: json!({}),
                id: None
            })]
        );
        c
    }

    /// QEMU's `{"return": {}}` to `command`.
    fn reply_empty(s: &mut Session, command: &Command) {
        let id = command.id.as_ref().unwrap();
        s.feed(format!("{{\"return\": {{}}, \"id\": {id}}}\r\n").as_bytes());
    }

    fn ret(value: Value, id: Option<Value>) -> ServerMessage {
        ServerMessage::Return(ReturnReply { ret: value, id })
    }

    /// A client with a deep queue does not keep another behind all of it: when a slot frees,
    /// the client with the fewest commands already with QEMU goes first, while each client's
    /// own commands keep their order.
    #[test]
    fn a_freed_slot_goes_to_the_client_with_the_fewest_commands_in_qemu() {
        let (mut s, mut mux) = setup(MuxConfig::default());
        let a = negotiated(&mut mux, false);
        let b = negotiated(&mut mux, false);
        // A fills every slot the multiplexer may use (one stays the owner's), one more waits.
        for i in 0..MAX_IN_FLIGHT {
            mux.feed(
                a,
                format!(r#"{{"execute":"query-status","id":"a{i}"}}"#).as_bytes(),
            );
        }
        mux.pump(&mut s);
        let first = upstream_output(&mut s);
        assert_eq!(first.len(), MAX_IN_FLIGHT - 1);
        // B's one command waits behind them.
        mux.feed(b, br#"{"execute":"query-name","id":"b"}"#);
        mux.pump(&mut s);
        assert!(upstream_output(&mut s).is_empty());
        // QEMU answers A's first: the free slot goes to B (nothing in QEMU), not to A's last.
        reply_empty(&mut s, &first[0]);
        mux.pump(&mut s);
        let next = upstream_output(&mut s);
        let names: Vec<&str> = next.iter().map(|c| c.execute.as_str()).collect();
        assert_eq!(names, ["query-name"]);
        // Then A's last, once another slot frees.
        reply_empty(&mut s, &first[1]);
        mux.pump(&mut s);
        let next = upstream_output(&mut s);
        let names: Vec<&str> = next.iter().map(|c| c.execute.as_str()).collect();
        assert_eq!(names, ["query-status"]);
        // A's replies come back with its own ids, in its order.
        let ids: Vec<Value> = client_output(&mut mux, a)
            .into_iter()
            .filter_map(|m| match m {
                ServerMessage::Return(r) => r.id,
                _ => None,
            })
            .collect();
        assert_eq!(ids, [json!("a0"), json!("a1")]);
    }

    fn error_desc(message: &ServerMessage) -> (&str, &str, Option<&Value>) {
        match message {
            ServerMessage::Error(e) => {
                (e.error.class.as_str(), e.error.desc.as_str(), e.id.as_ref())
            }
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn greeting_is_qemus_and_negotiation_is_like_qemus() {
        let (_s, mut mux) = setup(MuxConfig::default());
        let c = mux.add_client("test");
        match &client_output(&mut mux, c)[..] {
            [ServerMessage::Greeting(g)] => {
                assert_eq!(g.version.qemu.to_string(), "7.2.22");
                assert_eq!(g.version.package, "Debian");
                assert_eq!(g.capabilities, ["oob"]);
            }
            other => panic!("{other:?}"),
        }
        mux.feed(
            c,
            br#"{"execute":"query-status","id":"a"}{"execute":"nonexistent"}"#,
        );
        let out = client_output(&mut mux, c);
        assert_eq!(
            error_desc(&out[0]),
            (
                "CommandNotFound",
                check::EXPECTING_NEGOTIATION,
                Some(&json!("a"))
            )
        );
        assert_eq!(
            error_desc(&out[1]),
            ("CommandNotFound", check::EXPECTING_NEGOTIATION, None)
        );
        mux.feed(
            c,
            br#"{"execute":"qmp_capabilities","arguments":{"enable":["x"]},"id":2}"#,
        );
        let out = client_output(&mut mux, c);
        assert_eq!(
            error_desc(&out[0]),
            (
                "GenericError",
                "Parameter 'null' does not accept value 'x'",
                Some(&json!(2))
            )
        );
        mux.feed(c, br#"{"execute":"qmp_capabilities","id":3}"#);
        assert_eq!(client_output(&mut mux, c), [ret(json!({}), Some(json!(3)))]);
    }

    #[test]
    fn no_oob_offered_when_the_upstream_did_not_negotiate_it() {
        let mut s = Session::new(&Config::default().with_oob(crate::OobPolicy::Off));
        s.feed(GREETING);
        s.feed(b"{\"return\": {}, \"id\": 1}\r\n");
        let mut mux = Mux::for_session(&mut s, MuxConfig::default()).unwrap();
        let c = mux.add_client("test");
        match &client_output(&mut mux, c)[..] {
            [ServerMessage::Greeting(g)] => assert!(g.capabilities.is_empty()),
            other => panic!("{other:?}"),
        }
        mux.feed(
            c,
            br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":1}"#,
        );
        assert_eq!(
            error_desc(&client_output(&mut mux, c)[0]).1,
            "Capability oob not available"
        );
    }

    #[test]
    fn ids_are_rewritten_and_come_back_exactly() {
        let (mut s, mut mux) = setup(MuxConfig::default());
        let a = negotiated(&mut mux, false);
        let b = negotiated(&mut mux, false);
        let odd = json!({"k": [1, 2.5, null, "é"], "big": 12345678901234567890u64});
        mux.feed(a, br#"{"execute":"query-status","id":1}"#);
        mux.feed(
            b,
            format!(r#"{{"execute":"query-status","id":1}}{{"execute":"x","id":{odd}}}"#)
                .as_bytes(),
        );
        mux.feed(a, br#"{"execute":"query-status","id":null}"#);
        mux.pump(&mut s);
        let sent = upstream_output(&mut s);
        let ids: Vec<_> = sent.iter().map(|c| c.id.clone().unwrap()).collect();
        // Fresh upstream ids (the negotiation used 1), in the order the commands were taken.
        assert_eq!(ids, [json!(2), json!(3), json!(4), json!(5)]);
        assert!(sent
            .iter()
            .all(|c| c.id.as_ref().is_some_and(Value::is_u64)));
        // Replies in any order reach the right client with the client's own id.
        s.feed(b"{\"return\": \"x\", \"id\": 4}\r\n{\"return\": \"a1\", \"id\": 2}\r\n");
        s.feed(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"d\"}, \"id\": 5}\r\n");
        s.feed(b"{\"return\": \"b1\", \"id\": 3}\r\n");
        mux.pump(&mut s);
        assert_eq!(
            client_output(&mut mux, a),
            [
                ret(json!("a1"), Some(json!(1))),
                ServerMessage::Error(ErrorReply {
                    error: qmp_proto::ErrorInfo {
                        class: qmp_proto::ErrorClass::GenericError,
                        desc: "d".into()
                    },
                    id: Some(Value::Null)
                })
            ]
        );
        assert_eq!(
            client_output(&mut mux, b),
            [ret(json!("x"), Some(odd)), ret(json!("b1"), Some(json!(1)))]
        );
        assert_eq!(mux.stats().commands_forwarded, 4);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn idless_commands_get_idless_replies_in_order() {
        let (mut s, mut mux) = setup(MuxConfig::default());
        let a = negotiated(&mut mux, false);
        mux.feed(a, br#"{"execute":"a"}{"execute":"b"}"#);
        mux.pump(&mut s);
        let sent = upstream_output(&mut s);
        assert_eq!(sent.len(), 2);
        for command in &sent {
            let reply = format!(
                "{{\"return\": \"{}\", \"id\": {}}}\r\n",
                command.execute,
                command.id.as_ref().unwrap()
            );
            s.feed(reply.as_bytes());
        }
        mux.pump(&mut s);
        assert_eq!(
            client_output(&mut mux, a),
            [ret(json!("a"), None), ret(json!("b"), None)]
        );
    }

    fn event(name: &str) -> Vec<u8> {
        format!(
            "{{\"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}, \"event\": \"{name}\"}}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn events_reach_negotiated_clients_in_order_with_replies_and_the_owner_too() {
        let (mut s, mut mux) = setup(MuxConfig::default());
        let a = negotiated(&mut mux, false);
        let b = negotiated(&mut mux, true);
        let fresh = mux.add_client("not negotiated");
        client_output(&mut mux, fresh);
        mux.feed(a, br#"{"execute":"stop","id":"s"}"#);
        mux.pump(&mut s);
        let sent = upstream_output(&mut s);
        // QEMU sends STOP before the reply to `stop`.
        s.feed(&event("STOP"));
        reply_empty(&mut s, &sent[0]);
        s.feed(&event("RESUME"));
        mux.pump(&mut s);
        let names = |messages: Vec<ServerMessage>| -> Vec<String> {
            messages
                .into_iter()
                .map(|m| match m {
                    ServerMessage::Event(e) => e.event,
                    ServerMessage::Return(r) => format!("return {}", r.id.unwrap()),
                    other => format!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(
            names(client_output(&mut mux, a)),
            ["STOP", "return \"s\"", "RESUME"]
        );
        assert_eq!(names(client_output(&mut mux, b)), ["STOP", "RESUME"]);
        assert!(client_output(&mut mux, fresh).is_empty());
        let owner: Vec<_> = s.drain_events().into_iter().map(|e| e.event).collect();
        assert_eq!(owner, ["STOP", "RESUME"]);
        assert_eq!(mux.stats().events_delivered, 4);
    }

    #[test]
    fn exec_oob_passes_through_for_clients_that_negotiated_it() {
        let (mut s, mut mux) = setup(MuxConfig::default());
        let plain = negotiated(&mut mux, false);
        let oob = negotiated(&mut mux, true);
        mux.feed(plain, br#"{"exec-oob":"migrate-pause","id":1}"#);
        assert_eq!(
            error_desc(&client_output(&mut mux, plain)[0]),
            (
                "GenericError",
                "QMP input member 'exec-oob' is unexpected",
                Some(&json!(1))
            )
        );
        mux.feed(oob, br#"{"exec-oob":"migrate-pause","id":"o"}"#);
        mux.pump(&mut s);
        let sent = upstream_output(&mut s);
        assert_eq!(sent.len(), 1);
        assert!(sent[0].oob);
        assert_eq!(s.oob_in_flight(), 1);
        reply_empty(&mut s, &sent[0]);
        mux.pump(&mut s);
        assert_eq!(
            client_output(&mut mux, oob),
            [ret(json!({}), Some(json!("o")))]
        );
        assert_eq!(s.oob_in_flight(), 0);
    }

    #[test]
    fn garbage_is_answered_like_qemu_to_that_client_only() {
        let (mut s, mut mux) = setup(MuxConfig::default());
        let bad = negotiated(&mut mux, false);
        let good = negotiated(&mut mux, false);
        mux.feed(bad, b"garbage\n[1]\n{\"execute\":\"x\",\"foo\":1,\"id\":3}");
        mux.feed(bad, b"{\"execute\":\"query-status\",\"id\":4}");
        mux.pump(&mut s);
        let out = client_output(&mut mux, bad);
        assert_eq!(
            error_desc(&out[0]),
            (
                "GenericError",
                "JSON parse error, invalid keyword 'garbage'",
                None
            )
        );
        assert_eq!(
            error_desc(&out[1]),
            ("GenericError", "QMP input must be a JSON object", None)
        );
        assert_eq!(
            error_desc(&out[2]),
            (
                "GenericError",
                "QMP input member 'foo' is unexpected",
                Some(&json!(3))
            )
        );
        // The client carries on after its garbage.
        let sent = upstream_output(&mut s);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].execute, "query-status");
        assert!(client_output(&mut mux, good).is_empty());
    }

    #[test]
    fn own_answers_wait_for_the_replies_to_earlier_commands_as_from_qemu() {
        let (mut s, mut mux) = setup(MuxConfig::default());
        let a = negotiated(&mut mux, false);
        mux.feed(
            a,
            b"{\"execute\":\"slow\",\"id\":1}garbage\n{\"execute\":\"quit\",\"id\":\"q\"}{\"execute\":\"next\",\"id\":2}[1]\n",
        );
        mux.pump(&mut s);
        let sent = upstream_output(&mut s);
        assert_eq!(sent.len(), 2);
        // Nothing may overtake the reply to `slow`.
        assert!(client_output(&mut mux, a).is_empty());
        reply_empty(&mut s, &sent[0]);
        mux.pump(&mut s);
        let out = client_output(&mut mux, a);
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[0], ret(json!({}), Some(json!(1))));
        assert_eq!(
            error_desc(&out[1]),
            (
                "GenericError",
                "JSON parse error, invalid keyword 'garbage'",
                None
            )
        );
        assert_eq!(
            error_desc(&out[2]),
            ("GenericError", QUIT_REFUSED, Some(&json!("q")))
        );
        reply_empty(&mut s, &sent[1]);
        mux.pump(&mut s);
        let out = client_output(&mut mux, a);
        assert_eq!(out[0], ret(json!({}), Some(json!(2))));
        assert_eq!(
            error_desc(&out[1]),
            ("GenericError", "QMP input must be a JSON object", None)
        );
        // With nothing outstanding, an answer goes at once.
        mux.feed(a, b"42\n");
        assert_eq!(client_output(&mut mux, a).len(), 1);
    }

    #[test]
    fn bad_input_waiting_for_an_earlier_reply_counts_towards_qemus_limit_of_8() {
        let (mut s, mut mux) = setup(MuxConfig::default());
        let a = negotiated(&mut mux, false);
        mux.feed(a, br#"{"execute":"slow","id":1}"#);
        for _ in 0..6 {
            mux.feed(a, b"garbage\n");
        }
        assert!(mux.wants_input(a), "7 of 8 taken");
        mux.feed(a, b"garbage\ngarbage\ngarbage\n");
        assert!(!mux.wants_input(a), "8 taken: stop reading, as QEMU does");
        mux.pump(&mut s);
        let sent = upstream_output(&mut s);
        reply_empty(&mut s, &sent[0]);
        mux.pump(&mut s);
        // The reply, the 7 answers held back, then the rest taken once there was room.
        assert_eq!(client_output(&mut mux, a).len(), 1 + 7 + 2);
        assert!(mux.wants_input(a));
    }

    #[test]
    fn a_gone_clients_late_reply_is_dropped_and_its_waiting_commands_never_sent() {
        let (mut s, mut mux) = setup(MuxConfig::default());
        let a = negotiated(&mut mux, false);
        let b = negotiated(&mut mux, false);
        mux.feed(a, br#"{"execute":"slow","id":1}"#);
        mux.pump(&mut s);
        let sent = upstream_output(&mut s);
        mux.remove_client(a);
        reply_empty(&mut s, &sent[0]);
        mux.pump(&mut s);
        assert_eq!(mux.stats().late_replies_dropped, 1);
        assert_eq!(s.in_flight(), 0, "the slot is free again");
        assert!(client_output(&mut mux, b).is_empty());
        assert!(mux.output(a).is_empty());
        // Commands still waiting for a slot when their client leaves are never sent.
        for _ in 0..7 {
            s.send(Command::new("owner")).unwrap();
        }
        mux.feed(b, br#"{"execute":"queued","id":1}"#);
        mux.pump(&mut s);
        upstream_output(&mut s);
        mux.remove_client(b);
        s.feed(b"{\"return\": {}, \"id\": 3}\r\n");
        mux.pump(&mut s);
        assert!(upstream_output(&mut s).is_empty());
    }

    #[test]
    fn one_upstream_slot_stays_free_for_the_owner() {
        let (mut s, mut mux) = setup(MuxConfig::default());
        let clients: Vec<_> = (0..2).map(|_| negotiated(&mut mux, false)).collect();
        for c in &clients {
            for i in 0..8 {
                mux.feed(*c, format!(r#"{{"execute":"x","id":{i}}}"#).as_bytes());
            }
        }
        mux.pump(&mut s);
        assert_eq!(s.in_flight(), MAX_IN_FLIGHT - 1);
        assert!(
            s.send(Command::new("owner")).is_ok(),
            "the owner still has a slot"
        );
        // A client at QEMU's limit of 8 takes no more input until replies come.
        assert!(!mux.wants_input(clients[0]));
        mux.feed(clients[0], br#"{"execute":"ninth","id":9}"#);
        let mut sent = upstream_output(&mut s);
        assert_eq!(sent.len(), 8);
        // Answer everything (the owner's command too) until nothing more comes.
        let mut names = Vec::new();
        while !sent.is_empty() {
            for command in &sent {
                names.push(command.execute.clone());
                reply_empty(&mut s, command);
                mux.pump(&mut s);
                assert!(s.in_flight() < MAX_IN_FLIGHT || names.len() == 8);
            }
            sent = upstream_output(&mut s);
        }
        assert_eq!(names.len(), 16 + 1 + 1);
        assert_eq!(names.last().map(String::as_str), Some("ninth"));
        assert_eq!(client_output(&mut mux, clients[0]).len(), 9);
        assert_eq!(client_output(&mut mux, clients[1]).len(), 8);
    }

    #[test]
    fn a_client_that_stops_reading_is_dropped_others_carry_on() {
        let (mut s, mut mux) = setup(MuxConfig::default().with_max_queued_bytes(1000));
        let slow = negotiated(&mut mux, false);
        let fast = negotiated(&mut mux, false);
        for _ in 0..100 {
            s.feed(&event("STOP"));
            mux.pump(&mut s);
            assert!(mux.client_memory(slow) < 64 * 1024 + 2000);
            client_output(&mut mux, fast);
        }
        let dropped = mux.take_dropped();
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].0.id, slow);
        assert!(matches!(
            dropped[0].1,
            DropReason::Overflow { limit: 1000, .. }
        ));
        assert_eq!(mux.client_count(), 1);
        assert_eq!(mux.stats().clients_overflowed, 1);
        assert!(mux.output(slow).is_empty());
        // The gauges count only what is still held: the fast client and its buffers.
        let stats = mux.stats();
        assert_eq!(stats.clients, 1);
        assert_eq!(stats.buffered_bytes, mux.client_memory(fast) as u64);
        assert!(stats.buffered_bytes > 0);
        mux.remove_client(fast);
        assert_eq!((mux.stats().clients, mux.stats().buffered_bytes), (0, 0));
    }

    #[test]
    fn quit_refused_by_default() {
        let (mut s, mut mux) = setup(MuxConfig::default());
        let a = negotiated(&mut mux, false);
        mux.feed(a, br#"{"execute":"quit","id":"q"}"#);
        mux.pump(&mut s);
        assert_eq!(
            error_desc(&client_output(&mut mux, a)[0]),
            ("GenericError", QUIT_REFUSED, Some(&json!("q")))
        );
        assert!(upstream_output(&mut s).is_empty());
        assert!(mux.quit_by().is_none());
    }

    #[test]
    fn quit_allowed_names_the_client_and_ends_everyone_cleanly() {
        let (mut s, mut mux) = setup(MuxConfig::default().with_quit(QuitPolicy::Allow));
        let a = negotiated(&mut mux, false);
        let b = negotiated(&mut mux, false);
        mux.feed(b, br#"{"execute":"quit","id":"q"}"#);
        mux.pump(&mut s);
        assert_eq!(upstream_output(&mut s)[0].execute, "quit");
        assert_eq!(mux.quit_by().map(|c| c.id), Some(b));
        // QEMU sends SHUTDOWN and exits before replying: the clean close completes the quit.
        s.feed(b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"SHUTDOWN\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}}\r\n");
        s.feed_io_error("read", std::io::ErrorKind::ConnectionReset.into());
        mux.pump(&mut s);
        assert!(matches!(
            client_output(&mut mux, a)[..],
            [ServerMessage::Event(_)]
        ));
        let out = client_output(&mut mux, b);
        assert_eq!(out[1], ret(json!({}), Some(json!("q"))));
        assert!(mux.upstream_closed());
        assert!(mux.closing(a) && mux.closing(b));
        assert_eq!(mux.take_dropped().len(), 2);
        // A client that comes now is told and closed.
        let late = mux.add_client("late");
        assert!(mux.closing(late));
        assert!(matches!(
            client_output(&mut mux, late)[..],
            [ServerMessage::Error(_)]
        ));
    }

    #[test]
    fn clients_past_the_limit_are_refused() {
        let (_s, mut mux) = setup(MuxConfig::default().with_max_clients(1));
        let a = mux.add_client("a");
        let b = mux.add_client("b");
        assert!(!mux.closing(a));
        assert!(mux.closing(b));
        assert_eq!(mux.take_dropped()[0].1, DropReason::TooManyClients);
    }
}
