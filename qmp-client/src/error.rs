//! The crate's one error type: transport failures, protocol violations and QMP error replies.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qmp_proto::ErrorClass;

use crate::session::Phase;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong talking QMP.
///
/// A QMP error reply from the server is data ([`Error::Command`]), kept apart from transport and
/// protocol failures. Once the connection has failed, every call returns
/// [`Error::Disconnected`] carrying the first failure as its cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A unix socket path does not fit in `sockaddr_un`; detected before anything is created.
    #[error("unix socket path {path:?} is {len} bytes long, the limit is {limit} bytes")]
    PathTooLong {
        /// The offending path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The platform's usable limit (107 on Linux).
        limit: usize,
    },
    /// Connecting to a server failed.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The unix path or TCP address.
        address: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Connecting did not complete before the deadline.
    #[error("connecting to {address} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The unix path or TCP address.
        address: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Creating, binding or listening on a server socket failed.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The unix path or TCP address.
        address: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A shared monitor's socket path exists and is not a socket: it is never replaced.
    #[error("refusing to replace {path:?}: it exists and is not a socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A shared monitor's socket path is a socket something still listens on.
    #[error("{path:?} is in use: something listens on it")]
    SocketInUse {
        /// The path.
        path: PathBuf,
    },
    /// A shared monitor's TCP address is not a loopback address (QMP has no authentication).
    #[error("refusing to share QMP on {addr}: only loopback addresses are allowed")]
    NotLoopback {
        /// The address asked for.
        addr: std::net::SocketAddr,
    },
    /// Creating the private directory for a shared monitor's socket failed.
    #[error("cannot create a private directory in {parent:?}: {source}")]
    PrivateDir {
        /// Where it was to be created.
        parent: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Accepting the peer failed.
    #[error("cannot accept a connection on {address}: {source}")]
    Accept {
        /// The unix path or TCP address.
        address: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No peer connected before the deadline.
    #[error("no peer connected to {address} within {timeout:?}")]
    AcceptTimeout {
        /// The unix path or TCP address.
        address: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The abort fd (for example QEMU's pidfd) turned readable while we waited.
    #[error("wait aborted: the abort fd became readable")]
    Aborted,
    /// The server sent no greeting before the deadline.
    #[error("no QMP greeting within {timeout:?}")]
    GreetingTimeout {
        /// How long we waited.
        timeout: Duration,
    },
    /// The first message was not a QMP greeting.
    #[error("malformed greeting: {raw}")]
    Greeting {
        /// The offending bytes or object (bounded copy).
        raw: String,
        /// The decoding failure, when the bytes were not even a JSON object.
        #[source]
        source: Option<qmp_proto::Error>,
    },
    /// `qmp_capabilities` failed (error reply, timeout, EOF or garbage).
    #[error("capability negotiation failed: {cause}")]
    Negotiation {
        /// What went wrong.
        #[source]
        cause: Box<Error>,
    },
    /// The server answered a command with a QMP error reply.
    #[error("`{command}` failed: {}: {desc}", class.as_str())]
    Command {
        /// The command that was sent.
        command: String,
        /// The error class.
        class: ErrorClass,
        /// QEMU's human-readable description (not to be parsed).
        desc: String,
    },
    /// No reply (or no room to send, with 8 in-band commands in flight) before the deadline.
    ///
    /// The command is forgotten: its late reply is dropped and counted as an unknown reply.
    #[error("no reply to `{command}` within {waited:?}")]
    CommandTimeout {
        /// The command.
        command: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The reply carried our id but neither `return` nor a well-formed `error`.
    #[error("malformed reply to `{command}`: {raw}")]
    BadReply {
        /// The command.
        command: String,
        /// The reply (bounded copy).
        raw: String,
    },
    /// No matching event arrived before the (total) deadline.
    #[error("no event matching {names} within {timeout:?}")]
    EventTimeout {
        /// The event names waited for, comma-separated.
        names: String,
        /// The total wait.
        timeout: Duration,
    },
    /// Events were discarded because the queue was full ([`crate::OverflowPolicy::Error`]).
    /// Reported once by the next event call; the connection carries on.
    #[error("{dropped} events lost: the event queue (capacity {capacity}) was full")]
    EventsLost {
        /// Events discarded since the last report.
        dropped: u64,
        /// The queue's capacity.
        capacity: usize,
    },
    /// The server sent an `error` without an id while no id-less command was pending.
    #[error("server reported an error outside any command: {}: {desc}", class.as_str())]
    ServerParse {
        /// The error class.
        class: ErrorClass,
        /// The description.
        desc: String,
    },
    /// The server's bytes could not be decoded (malformed JSON, not an object, too large...).
    #[error("undecodable message from the server: {source}")]
    Decode {
        /// The decoder's error, with a bounded copy of the bytes.
        #[source]
        source: qmp_proto::Error,
    },
    /// The server closed the connection.
    #[error("{}", eof_text(*phase, *partial_len))]
    Eof {
        /// What the session was doing.
        phase: Phase,
        /// Bytes of an incomplete message left in the buffer.
        partial_len: usize,
    },
    /// A socket operation failed.
    #[error("socket {op} failed: {source}")]
    Io {
        /// The operation (`read`, `write`, `poll`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The connection was closed cleanly: after our `quit`, or by [`crate::Connection::close`].
    #[error("connection closed")]
    Closed,
    /// The connection is gone; the cause is the failure that ended it.
    #[error("disconnected: {cause}")]
    Disconnected {
        /// The first failure of the session.
        #[source]
        cause: Arc<Error>,
    },
    /// The session is still in its handshake and cannot take commands yet.
    #[error("the session cannot send commands during {phase}")]
    NotReady {
        /// The current phase.
        phase: Phase,
    },
    /// Already 8 in-band commands in flight (the QMP limit), or, for an out-of-band command,
    /// [`Config::max_oob_in_flight`](crate::Config::max_oob_in_flight) out-of-band ones; the
    /// blocking calls wait instead.
    #[error("{limit} commands of the same kind (in-band or out-of-band) already in flight")]
    TooManyInFlight {
        /// The limit that was reached (8 for in-band commands).
        limit: usize,
    },
    /// A command nests objects and arrays deeper than QEMU's JSON parser accepts
    /// ([`qmp_proto::MAX_NESTING`]); it was not sent (QEMU's refusal would carry no id, and
    /// its parser would read what follows out of step).
    #[error("`{command}` nests {depth} levels deep; QEMU's JSON parser accepts at most {limit}")]
    CommandTooDeep {
        /// The command's name.
        command: String,
        /// Its levels of objects and arrays, the command object included.
        depth: usize,
        /// The most QEMU accepts.
        limit: usize,
    },
    /// An id-less command is already waiting for its reply, or timed out with its reply still
    /// due (at most one may be outstanding: id-less replies cannot be told apart).
    #[error("an id-less command is already in flight")]
    IdlessBusy,
    /// The request id is not (or no longer) pending.
    #[error("request {id} is not pending")]
    UnknownRequest {
        /// The id.
        id: u64,
    },
    /// A guest command started through the guest agent was still running at the deadline.
    #[error("guest command {path:?} (guest pid {pid}) still running after {waited:?}")]
    GuestExecTimeout {
        /// The program.
        path: String,
        /// Its pid in the guest.
        pid: i64,
        /// How long we waited.
        waited: Duration,
    },
    /// File descriptors can only be passed over a unix socket.
    #[error("file descriptors can only be passed over a unix socket")]
    FdPassingUnsupported,
}

/// [`Error::Eof`]'s text: when the server closed, and the unfinished message it cut off.
fn eof_text(phase: Phase, partial_len: usize) -> String {
    let when = match phase {
        Phase::Greeting => " before its greeting",
        Phase::Negotiation => " during capability negotiation",
        Phase::Ready | Phase::Closed => "",
    };
    match partial_len {
        0 => format!("the server closed the connection{when}"),
        n => {
            format!("the server closed the connection{when}, {n} bytes into an unfinished message")
        }
    }
}

impl Error {
    /// The root failure: the cause of a [`Error::Disconnected`], else `self`.
    pub fn root(&self) -> &Error {
        match self {
            Error::Disconnected { cause } => cause.root(),
            other => other,
        }
    }

    /// True for a clean close: [`Error::Closed`], directly or as a disconnection cause.
    pub fn is_closed(&self) -> bool {
        matches!(self.root(), Error::Closed)
    }
}
