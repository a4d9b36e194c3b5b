//! A client for QEMU's guest agent (`qemu-ga`): the QMP wire format without greeting or
//! negotiation, made safe for a serial line by `guest-sync-delimited`.
//!
//! # Why not [`crate::Connection`]
//!
//! The agent speaks QMP's JSON, but the channel is not a monitor socket: it is a serial port or
//! virtio-serial port inside the guest, which keeps bytes across agent restarts, delivers
//! halves of replies that were cut when the guest or agent died, and carries the agent's
//! `0xFF` delimiter. A monitor session treats undecodable bytes as fatal; here they are normal
//! and must be skipped. So [`Agent`] is a small request/reply driver of its own (no events, one
//! request at a time) over the same transport pieces and the same decoder.
//!
//! # Protocol contracts
//!
//! - **Sync first.** Before the first command, and again after any timeout, the client sends
//!   the `0xFF` byte (which resets the agent's JSON parser, whatever half-message it held) and
//!   `guest-sync-delimited` with a fresh random id. Everything read is discarded up to the
//!   agent's own `0xFF` delimiter, and replies are skipped until the one that returns that id.
//!   A sync attempt that gets no answer within [`AgentConfig::sync_attempt_timeout`] is sent
//!   again with a new id, until the caller's deadline.
//! - **Stale replies are skipped.** Every command carries an `id` (a small counter from a random start: the agent
//!   answers in order, so the sync has already discarded every reply to a request before it);
//!   the agent echoes it. A reply with another id or none (the late answer of a timed-out command, the agent's
//!   complaint about our `0xFF`, garbage) is logged, counted ([`Agent::stale_replies`]) and
//!   never returned as an answer.
//! - **Deadlines.** Every call has one ([`AgentConfig::command_timeout`] or an explicit
//!   timeout). A timeout returns [`Error::CommandTimeout`] and marks the channel out of sync;
//!   the next call syncs again, so it works as soon as the agent answers again.
//! - **No reply on success.** `guest-shutdown` and `guest-suspend-*` do not answer when they
//!   work; as in QEMU's `qemu-ga-client`, a timeout (or the channel closing) counts as success
//!   there, and an error reply is still an error.
//!
//! ```no_run
//! use std::time::Duration;
//! use qmp_client::{Agent, AgentConfig};
//!
//! # fn main() -> qmp_client::Result<()> {
//! // QEMU started with `-chardev socket,id=qga0,path=/tmp/qga.sock,server=on,wait=off
//! //   -device isa-serial,chardev=qga0` and `qemu-ga -m isa-serial -p /dev/ttyS1` in the guest.
//! let mut agent = Agent::connect_unix("/tmp/qga.sock".as_ref(), &AgentConfig::default())?;
//! agent.ping()?;
//! let done = agent.run("/bin/sh", &["-c", "echo hello; exit 3"], Duration::from_secs(10))?;
//! assert_eq!(done.exit_code, Some(3));
//! assert_eq!(done.stdout, b"hello\n");
//! # Ok(())
//! # }
//! ```

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io;
use std::net::ToSocketAddrs;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use mio::{Events, Poll};
use qmp_proto::{Command, Decoder, DecoderConfig, ServerMessage};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::io::{self as sockio, Chunk, Stream, READ_CHUNK};
use crate::session::{excerpt, Phase};

/// The byte that resets the agent's parser and precedes the reply to `guest-sync-delimited`.
const DELIMITER: u8 = 0xFF;

/// Settings of an [`Agent`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AgentConfig {
    /// Deadline for connecting (unix path or TCP). Default 10 s.
    pub connect_timeout: Duration,
    /// Deadline of each command, the sync before it included. Default 30 s.
    pub command_timeout: Duration,
    /// How long one `guest-sync-delimited` waits before it is sent again with a new id.
    /// Default 500 ms (a round trip over an ISA serial port takes about 2-4 ms).
    pub sync_attempt_timeout: Duration,
    /// How long `guest-shutdown` and `guest-suspend-*` wait for an error reply before they
    /// count as done (they do not answer when they work). Default 1 s.
    pub no_reply_wait: Duration,
    /// Largest reply accepted, in bytes. Default 10 MiB.
    pub max_message_size: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
            sync_attempt_timeout: Duration::from_millis(500),
            no_reply_wait: Duration::from_secs(1),
            max_message_size: DecoderConfig::DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

impl AgentConfig {
    /// Sets [`AgentConfig::command_timeout`].
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sets [`AgentConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`AgentConfig::sync_attempt_timeout`].
    pub fn with_sync_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.sync_attempt_timeout = timeout;
        self
    }

    /// Sets [`AgentConfig::no_reply_wait`].
    pub fn with_no_reply_wait(mut self, wait: Duration) -> Self {
        self.no_reply_wait = wait;
        self
    }
}

/// The state of a guest command started with [`Agent::exec`] (`guest-exec-status`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExecStatus {
    /// Whether the process has ended.
    pub exited: bool,
    /// Its exit code, once it exited normally.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// What it wrote to stdout (when output was captured).
    pub stdout: Vec<u8>,
    /// What it wrote to stderr (when output was captured).
    pub stderr: Vec<u8>,
    /// The agent cut the output at its limit (16 MiB in QEMU 7.2).
    pub truncated: bool,
}

/// One `guest-file-read` result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileChunk {
    /// The bytes read.
    pub data: Vec<u8>,
    /// The end of the file was reached.
    pub eof: bool,
}

/// How `guest-suspend-*` suspends the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuspendMode {
    /// Suspend to disk (`guest-suspend-disk`).
    Disk,
    /// Suspend to RAM (`guest-suspend-ram`).
    Ram,
    /// Both (`guest-suspend-hybrid`).
    Hybrid,
}

impl SuspendMode {
    /// The agent command.
    pub fn command(self) -> &'static str {
        match self {
            SuspendMode::Disk => "guest-suspend-disk",
            SuspendMode::Ram => "guest-suspend-ram",
            SuspendMode::Hybrid => "guest-suspend-hybrid",
        }
    }
}

/// A connection to QEMU's guest agent; see the module docs for the protocol.
#[derive(Debug)]
pub struct Agent {
    stream: Stream,
    poll: Poll,
    events: Events,
    buf: Box<[u8]>,
    decoder: Decoder,
    config: AgentConfig,
    /// Discarding input until the agent's next `0xFF` (right after a sync request).
    awaiting_delimiter: bool,
    synced: bool,
    next_id: u64,
    stale: u64,
    random: RandomState,
    closed: bool,
}

impl Agent {
    /// Adopts a connected unix socket, e.g. our end of the socketpair handed to QEMU as the
    /// agent's chardev (`-chardev socket,id=qga0,fd=N`). No I/O happens yet.
    pub fn from_unix_stream(
        stream: std::os::unix::net::UnixStream,
        config: &AgentConfig,
    ) -> Result<Agent> {
        stream.set_nonblocking(true).map_err(|e| Error::Io {
            op: "set_nonblocking",
            source: e,
        })?;
        Agent::new(Stream::Unix(mio::net::UnixStream::from_std(stream)), config)
    }

    /// Connects to a chardev socket at `path` (QEMU listening: `server=on,wait=off`).
    pub fn connect_unix(path: &Path, config: &AgentConfig) -> Result<Agent> {
        crate::sys::check_unix_path(path)?;
        let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| Error::Connect {
            address: path.display().to_string(),
            source: e,
        })?;
        Agent::from_unix_stream(stream, config)
    }

    /// Connects over TCP (every resolved address in turn, within
    /// [`AgentConfig::connect_timeout`]).
    pub fn connect_tcp(addr: impl ToSocketAddrs, config: &AgentConfig) -> Result<Agent> {
        let (_, stream) = crate::connection::connect_tcp_any(addr, config.connect_timeout)?;
        Agent::new(Stream::Tcp(stream), config)
    }

    fn new(stream: Stream, config: &AgentConfig) -> Result<Agent> {
        let poll = sockio::new_poll(stream.as_raw_fd())?;
        let random = RandomState::new();
        // Start the small id counter somewhere unpredictable, so even a misbehaving peer's
        // late reply is unlikely to carry the id we wait for.
        let next_id = random.hash_one(std::process::id()) % 999;
        Ok(Agent {
            stream,
            poll,
            events: Events::with_capacity(4),
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
            decoder: Decoder::with_config(
                DecoderConfig::default().with_max_message_size(config.max_message_size),
            ),
            config: config.clone(),
            awaiting_delimiter: false,
            synced: false,
            next_id,
            stale: 0,
            random,
            closed: false,
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Replies skipped because they did not answer the request waited for (stale answers of
    /// timed-out commands, replies to another sync, the agent's complaints about garbage).
    pub fn stale_replies(&self) -> u64 {
        self.stale
    }

    /// Whether the channel is in sync (a sync succeeded and no call has timed out since).
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Synchronises with the agent within `timeout` (see the module docs). Called by every
    /// command when the channel is out of sync; call it directly to wait for an agent to come
    /// up.
    pub fn sync(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        self.sync_until(start + timeout, start)
    }

    fn sync_until(&mut self, deadline: Instant, start: Instant) -> Result<()> {
        self.synced = false;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::CommandTimeout {
                    command: "guest-sync-delimited".into(),
                    waited: now - start,
                });
            }
            // A random 31-bit id: the agent echoes it as the return value (a JSON integer).
            let token = self.random.hash_one((self.next_id, now)) >> 33;
            let mut bytes = vec![DELIMITER];
            Command::new("guest-sync-delimited")
                .with_arguments(map(json!({ "id": token })))
                .encode_into(&mut bytes);
            log::debug!("--> 0xFF guest-sync-delimited {token}");
            self.write_all(&bytes, deadline, "guest-sync-delimited", start)?;
            self.awaiting_delimiter = true;
            self.decoder = Decoder::with_config(self.decoder.config());
            let attempt_end = deadline.min(now + self.config.sync_attempt_timeout);
            loop {
                match self.next_reply(attempt_end)? {
                    None => break,
                    Some(ServerMessage::Return(reply)) if reply.ret.as_u64() == Some(token) => {
                        log::debug!("<-- synced ({token})");
                        self.synced = true;
                        return Ok(());
                    }
                    Some(other) => self.skip(&other, "a sync"),
                }
            }
            log::debug!("no answer to guest-sync-delimited {token}; trying again");
        }
    }

    /// Sends `command` and returns its `return` value, within
    /// [`AgentConfig::command_timeout`].
    pub fn execute(&mut self, command: &str, args: Option<Map<String, Value>>) -> Result<Value> {
        self.execute_with_timeout(command, args, self.config.command_timeout)
    }

    /// [`Agent::execute`] with its own timeout (the sync before it included).
    pub fn execute_with_timeout(
        &mut self,
        command: &str,
        args: Option<Map<String, Value>>,
        timeout: Duration,
    ) -> Result<Value> {
        let start = Instant::now();
        let deadline = start + timeout;
        match self.request(command, args, deadline, start)? {
            Some(value) => Ok(value),
            None => {
                self.synced = false;
                Err(Error::CommandTimeout {
                    command: command.into(),
                    waited: start.elapsed(),
                })
            }
        }
    }

    /// Sends a command that does not answer when it works (`guest-shutdown`,
    /// `guest-suspend-*`): waits [`AgentConfig::no_reply_wait`] for an error reply; silence or
    /// the channel closing is success. The channel is out of sync afterwards.
    pub fn execute_no_reply(
        &mut self,
        command: &str,
        args: Option<Map<String, Value>>,
    ) -> Result<()> {
        let start = Instant::now();
        // The sync may take the whole command timeout; the wait for an error only the short one.
        if !self.synced {
            self.sync_until(start + self.config.command_timeout, start)?;
        }
        let deadline = Instant::now() + self.config.no_reply_wait;
        let result = self.request(command, args, deadline, start);
        self.synced = false;
        match result {
            Ok(_) => Ok(()),
            Err(err) if is_channel_end(&err) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// One request: sync if needed, send with a fresh id, wait for the reply with that id.
    /// `Ok(None)` when the deadline passed first.
    fn request(
        &mut self,
        command: &str,
        args: Option<Map<String, Value>>,
        deadline: Instant,
        start: Instant,
    ) -> Result<Option<Value>> {
        if self.closed {
            return Err(Error::Closed);
        }
        // Small ids are enough (and each byte costs time on a serial line): a sync discards
        // every reply the agent wrote before it, and any timeout forces a sync, so an id only
        // has to be unique among the requests since the last sync.
        self.next_id = self.next_id % 999 + 1;
        let id = self.next_id;
        let mut cmd = Command::new(command).with_id(id);
        if let Some(args) = args {
            cmd = cmd.with_arguments(args);
        }
        // Refused before any I/O: QEMU's agent parses with the same limit as its monitor.
        crate::session::check_nesting(&cmd)?;
        if !self.synced {
            self.sync_until(deadline, start)?;
        }
        let mut bytes = Vec::new();
        cmd.encode_into(&mut bytes);
        if log::log_enabled!(log::Level::Debug) {
            log::debug!("--> {}", String::from_utf8_lossy(&bytes));
        }
        self.write_all(&bytes, deadline, command, start)?;
        loop {
            let Some(message) = self.next_reply(deadline)? else {
                return Ok(None);
            };
            let ours = message.id().and_then(Value::as_u64) == Some(id);
            match message {
                ServerMessage::Return(reply) if ours => return Ok(Some(reply.ret)),
                ServerMessage::Error(reply) if ours => {
                    return Err(Error::Command {
                        command: command.into(),
                        class: reply.error.class,
                        desc: reply.error.desc,
                    })
                }
                other => self.skip(&other, command),
            }
        }
    }

    fn skip(&mut self, message: &ServerMessage, waiting_for: &str) {
        self.stale += 1;
        log::warn!(
            "guest agent: skipped a reply that does not answer {waiting_for}: {}",
            excerpt(&message.to_value().to_string())
        );
    }

    /// The next decoded message, reading as needed; `None` at the deadline. Undecodable input
    /// is skipped; input before the awaited delimiter is discarded.
    fn next_reply(&mut self, deadline: Instant) -> Result<Option<ServerMessage>> {
        loop {
            while let Some(next) = self.decoder.next_message() {
                match next {
                    Ok(message) => {
                        if log::log_enabled!(log::Level::Debug) {
                            log::debug!("<-- {}", message.to_value());
                        }
                        return Ok(Some(message));
                    }
                    Err(err) => {
                        self.stale += 1;
                        log::warn!("guest agent: skipped undecodable input: {err}");
                    }
                }
            }
            if !self.read_some(deadline)? {
                return Ok(None);
            }
        }
    }

    /// Reads until the socket is empty (`WouldBlock` or a short read), feeding the decoder;
    /// waits for readiness first when nothing is there. False at the deadline with nothing
    /// read.
    fn read_some(&mut self, deadline: Instant) -> Result<bool> {
        let mut got = false;
        loop {
            match sockio::read_chunk(&self.stream, &mut self.buf) {
                Chunk::Data(n) => {
                    got = true;
                    let buf = std::mem::take(&mut self.buf);
                    self.take_input(&buf[..n]);
                    self.buf = buf;
                    // A short read emptied the socket: the next arrival is a new readiness
                    // edge, so no read to see WouldBlock is needed (the agent's replies come
                    // from a UART a few bytes at a time; this saves a system call per piece).
                    if n < self.buf.len() {
                        return Ok(true);
                    }
                }
                Chunk::WouldBlock => {
                    if got {
                        return Ok(true);
                    }
                    if Instant::now() >= deadline {
                        return Ok(false);
                    }
                    sockio::wait(&mut self.poll, &mut self.events, deadline)?;
                }
                Chunk::Eof => {
                    self.closed = true;
                    return Err(Error::Eof {
                        phase: Phase::Ready,
                        partial_len: self.decoder.buffered_len(),
                    });
                }
                Chunk::Failed(source) => {
                    self.closed = true;
                    return Err(Error::Io { op: "read", source });
                }
            }
        }
    }

    /// Feeds input to the decoder. Every `0xFF` starts afresh: it is the agent's delimiter
    /// before a sync reply, and whatever half-message came before it will never be finished.
    fn take_input(&mut self, mut input: &[u8]) {
        log::trace!("guest agent: read {} bytes", input.len());
        while let Some(at) = input.iter().position(|&b| b == DELIMITER) {
            if !self.awaiting_delimiter {
                self.decoder.feed(&input[..at]);
                if self.decoder.in_message() {
                    self.stale += 1;
                    log::warn!("guest agent: a partial reply was cut by the sync delimiter");
                }
            }
            self.decoder = Decoder::with_config(self.decoder.config());
            self.awaiting_delimiter = false;
            input = &input[at + 1..];
        }
        if !self.awaiting_delimiter {
            self.decoder.feed(input);
        }
    }

    fn write_all(
        &mut self,
        mut bytes: &[u8],
        deadline: Instant,
        command: &str,
        start: Instant,
    ) -> Result<()> {
        while !bytes.is_empty() {
            match self.stream.write(bytes) {
                Ok(0) => {
                    return Err(Error::Io {
                        op: "write",
                        source: io::ErrorKind::WriteZero.into(),
                    })
                }
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        self.synced = false;
                        return Err(Error::CommandTimeout {
                            command: command.into(),
                            waited: start.elapsed(),
                        });
                    }
                    // The peer's buffer is full (nobody reads the channel): wait a little
                    // rather than register write interest for this rare case.
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(source) => {
                    self.closed = true;
                    return Err(Error::Io {
                        op: "write",
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    // ----- The commands people use -----

    /// `guest-ping`.
    pub fn ping(&mut self) -> Result<()> {
        self.execute("guest-ping", None).map(drop)
    }

    /// `guest-info`: the agent's version and its commands.
    pub fn info(&mut self) -> Result<Value> {
        self.execute("guest-info", None)
    }

    /// `guest-exec`: starts `path` with `args` in the guest, capturing its output; returns the
    /// guest pid.
    pub fn exec(&mut self, path: &str, args: &[&str]) -> Result<i64> {
        let reply = self.execute(
            "guest-exec",
            Some(map(
                json!({ "path": path, "arg": args, "capture-output": true }),
            )),
        )?;
        reply["pid"]
            .as_i64()
            .ok_or_else(|| bad_reply("guest-exec", &reply))
    }

    /// `guest-exec-status` of a process started by [`Agent::exec`].
    pub fn exec_status(&mut self, pid: i64) -> Result<ExecStatus> {
        let reply = self.execute("guest-exec-status", Some(map(json!({ "pid": pid }))))?;
        let bad = || bad_reply("guest-exec-status", &reply);
        let decode = |key: &str| -> Result<Vec<u8>> {
            match reply.get(key) {
                None => Ok(Vec::new()),
                Some(text) => text.as_str().and_then(base64::decode).ok_or_else(bad),
            }
        };
        let small = |key: &str| reply.get(key).and_then(Value::as_i64).map(|v| v as i32);
        Ok(ExecStatus {
            exited: reply["exited"].as_bool().ok_or_else(bad)?,
            exit_code: small("exitcode"),
            signal: small("signal"),
            stdout: decode("out-data")?,
            stderr: decode("err-data")?,
            truncated: reply.get("out-truncated").and_then(Value::as_bool) == Some(true)
                || reply.get("err-truncated").and_then(Value::as_bool) == Some(true),
        })
    }

    /// Runs `path` with `args` in the guest and waits until it exits, within `timeout`
    /// (`guest-exec`, then `guest-exec-status` with a growing pause, 1 ms up to 50 ms).
    /// [`Error::GuestExecTimeout`] when it is still running at the deadline.
    pub fn run(&mut self, path: &str, args: &[&str], timeout: Duration) -> Result<ExecStatus> {
        let start = Instant::now();
        let deadline = start + timeout;
        let pid = self.exec(path, args)?;
        let mut pause = Duration::from_millis(1);
        loop {
            let status = self.exec_status(pid)?;
            if status.exited {
                return Ok(status);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::GuestExecTimeout {
                    path: path.into(),
                    pid,
                    waited: now - start,
                });
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// `guest-file-open`; returns the handle.
    pub fn file_open(&mut self, path: &str, mode: &str) -> Result<i64> {
        let reply = self.execute(
            "guest-file-open",
            Some(map(json!({ "path": path, "mode": mode }))),
        )?;
        reply
            .as_i64()
            .ok_or_else(|| bad_reply("guest-file-open", &reply))
    }

    /// `guest-file-read` of at most `count` bytes.
    pub fn file_read(&mut self, handle: i64, count: usize) -> Result<FileChunk> {
        let reply = self.execute(
            "guest-file-read",
            Some(map(json!({ "handle": handle, "count": count }))),
        )?;
        let bad = || bad_reply("guest-file-read", &reply);
        Ok(FileChunk {
            data: reply["buf-b64"]
                .as_str()
                .and_then(base64::decode)
                .ok_or_else(bad)?,
            eof: reply["eof"].as_bool().ok_or_else(bad)?,
        })
    }

    /// `guest-file-write` of `data`; returns the bytes written.
    pub fn file_write(&mut self, handle: i64, data: &[u8]) -> Result<usize> {
        let reply = self.execute(
            "guest-file-write",
            Some(map(
                json!({ "handle": handle, "buf-b64": base64::encode(data) }),
            )),
        )?;
        reply["count"]
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| bad_reply("guest-file-write", &reply))
    }

    /// `guest-file-close`.
    pub fn file_close(&mut self, handle: i64) -> Result<()> {
        self.execute("guest-file-close", Some(map(json!({ "handle": handle }))))
            .map(drop)
    }

    /// Reads a whole guest file (open, read in 64 KiB pieces until EOF, close).
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>> {
        let handle = self.file_open(path, "r")?;
        let mut data = Vec::new();
        let result = loop {
            match self.file_read(handle, 64 * 1024) {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk.data);
                    if chunk.eof || chunk.data.is_empty() {
                        break Ok(());
                    }
                }
                Err(err) => break Err(err),
            }
        };
        let closed = self.file_close(handle);
        result.and(closed).map(|()| data)
    }

    /// `guest-fsfreeze-status`: `thawed` or `frozen`.
    pub fn fsfreeze_status(&mut self) -> Result<String> {
        let reply = self.execute("guest-fsfreeze-status", None)?;
        reply
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| bad_reply("guest-fsfreeze-status", &reply))
    }

    /// `guest-fsfreeze-freeze`; returns how many filesystems were frozen.
    pub fn fsfreeze_freeze(&mut self) -> Result<i64> {
        let reply = self.execute("guest-fsfreeze-freeze", None)?;
        reply
            .as_i64()
            .ok_or_else(|| bad_reply("guest-fsfreeze-freeze", &reply))
    }

    /// `guest-fsfreeze-thaw`; returns how many filesystems were thawed.
    pub fn fsfreeze_thaw(&mut self) -> Result<i64> {
        let reply = self.execute("guest-fsfreeze-thaw", None)?;
        reply
            .as_i64()
            .ok_or_else(|| bad_reply("guest-fsfreeze-thaw", &reply))
    }

    /// `guest-fstrim` with a minimum extent in bytes (0: all); returns the agent's report.
    pub fn fstrim(&mut self, minimum: u64) -> Result<Value> {
        self.execute("guest-fstrim", Some(map(json!({ "minimum": minimum }))))
    }

    /// `guest-network-get-interfaces`.
    pub fn network_interfaces(&mut self) -> Result<Value> {
        self.execute("guest-network-get-interfaces", None)
    }

    /// `guest-shutdown` with `mode` (`powerdown`, `halt` or `reboot`). No reply is success.
    pub fn shutdown(&mut self, mode: &str) -> Result<()> {
        self.execute_no_reply("guest-shutdown", Some(map(json!({ "mode": mode }))))
    }

    /// `guest-suspend-disk`, `-ram` or `-hybrid`. No reply is success.
    pub fn suspend(&mut self, mode: SuspendMode) -> Result<()> {
        self.execute_no_reply(mode.command(), None)
    }
}

fn map(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn bad_reply(command: &str, reply: &Value) -> Error {
    Error::BadReply {
        command: command.into(),
        raw: excerpt(&reply.to_string()),
    }
}

/// The channel ended: what a guest that powers off or suspends does to it.
fn is_channel_end(err: &Error) -> bool {
    matches!(err, Error::Eof { .. } | Error::Closed)
        || matches!(err, Error::Io { source, .. } if matches!(
            source.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ))
}

/// Base64 (RFC 4648, standard alphabet, padded) for the agent's `buf-b64`, `out-data` and
/// `err-data`: GLib's `g_base64_encode`, which qemu-ga uses, always pads.
mod base64 {
    use ::base64::engine::general_purpose::STANDARD;
    use ::base64::Engine;

    pub(super) fn encode(data: &[u8]) -> String {
        STANDARD.encode(data)
    }

    /// None for input that is not padded base64.
    pub(super) fn decode(text: &str) -> Option<Vec<u8>> {
        STANDARD.decode(text).ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips_and_rejects_garbage() {
            for (plain, coded) in [
                (&b""[..], ""),
                (b"f", "Zg=="),
                (b"fo", "Zm8="),
                (b"foo", "Zm9v"),
                (b"hello\n", "aGVsbG8K"),
            ] {
                assert_eq!(encode(plain), coded);
                assert_eq!(decode(coded).as_deref(), Some(plain));
            }
            assert_eq!(decode("Zm9"), None);
            assert_eq!(decode("Zm=v"), None);
            assert_eq!(decode("Z==="), None);
            assert_eq!(decode("Zg==Zg=="), None);
            assert_eq!(decode("Zm9!"), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;

    /// What the fake agent does with one command: the bytes it sends back.
    type Script = Box<dyn FnMut(&Map<String, Value>) -> Vec<u8> + Send>;

    /// A fake agent on the other end of a socketpair: splits input at `0xFF` (as qemu-ga's
    /// parser resets there), decodes each command and answers through `script`. Reports
    /// every command name it saw.
    fn fake_agent(mut script: Script) -> (Agent, mpsc::Receiver<String>) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let (seen_tx, seen_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut decoder = Decoder::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = match theirs.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                for part in buf[..n].split(|&b| b == DELIMITER) {
                    decoder.feed(part);
                    while let Some(Ok(command)) = decoder.next_object() {
                        let name = command["execute"].as_str().unwrap_or("").to_owned();
                        let reply = script(&command);
                        if seen_tx.send(name).is_err() || theirs.write_all(&reply).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let config = AgentConfig::default()
            .with_command_timeout(Duration::from_secs(5))
            .with_sync_attempt_timeout(Duration::from_millis(50));
        (
            Agent::from_unix_stream(ours, &config).expect("agent"),
            seen_rx,
        )
    }

    /// The reply a real agent gives: `guest-sync-delimited` answered after `0xFF`, the rest
    /// echoing the id.
    fn answer(command: &Map<String, Value>, ret: Value) -> Vec<u8> {
        if command["execute"] == "guest-sync-delimited" {
            let mut out = vec![DELIMITER];
            out.extend_from_slice(
                format!("{{\"return\": {}}}\n", command["arguments"]["id"]).as_bytes(),
            );
            return out;
        }
        let id = command.get("id").cloned().unwrap_or(Value::Null);
        format!("{}\n", json!({ "return": ret, "id": id })).into_bytes()
    }

    #[test]
    fn syncs_before_the_first_command_and_skips_stale_replies() {
        let (mut agent, seen) = fake_agent(Box::new(|command| {
            let mut out = Vec::new();
            if command["execute"] == "guest-sync-delimited" {
                // Garbage and a half reply before the delimiter, as a serial line delivers.
                out.extend_from_slice(b"{\"return\": {}, \"id\": 9");
            } else {
                // A stale answer of an earlier command and a reply to another sync first.
                out.extend_from_slice(b"{\"return\": {\"stale\": true}, \"id\": 1000}\n");
                out.extend_from_slice(b"{\"return\": 12345}\n");
                out.extend_from_slice(b"\x01not json\n");
            }
            out.extend_from_slice(&answer(command, json!({ "version": "7.2" })));
            out
        }));
        let info = agent.info().expect("info");
        assert_eq!(info, json!({ "version": "7.2" }));
        assert_eq!(seen.recv().ok().as_deref(), Some("guest-sync-delimited"));
        assert_eq!(seen.recv().ok().as_deref(), Some("guest-info"));
        assert!(agent.is_synced());
        assert_eq!(agent.stale_replies(), 3, "stale reply, other sync, garbage");
        // In sync now: the next command goes out without a sync.
        agent.ping().expect("ping");
        assert_eq!(seen.recv().ok().as_deref(), Some("guest-ping"));
    }

    #[test]
    fn a_silent_agent_times_out_and_the_channel_resyncs_when_it_is_back() {
        let silent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = silent.clone();
        let (mut agent, seen) = fake_agent(Box::new(move |command| {
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                return Vec::new();
            }
            answer(command, json!({}))
        }));
        agent.ping().expect("first ping");
        silent.store(true, std::sync::atomic::Ordering::SeqCst);
        let start = Instant::now();
        let err = agent
            .execute_with_timeout("guest-ping", None, Duration::from_millis(200))
            .expect_err("silent agent");
        let waited = start.elapsed();
        assert!(
            matches!(&err, Error::CommandTimeout { command, .. } if command == "guest-ping"),
            "{err:?}"
        );
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(2));
        assert!(!agent.is_synced());
        // Still silent: the sync itself times out, typed, within the deadline.
        let err = agent
            .execute_with_timeout("guest-ping", None, Duration::from_millis(150))
            .expect_err("still silent");
        assert!(
            matches!(&err, Error::CommandTimeout { command, .. } if command == "guest-sync-delimited"),
            "{err:?}"
        );
        silent.store(false, std::sync::atomic::Ordering::SeqCst);
        agent.ping().expect("ping once the agent answers again");
        let names: Vec<String> = seen.try_iter().collect();
        assert_eq!(
            names.first().map(String::as_str),
            Some("guest-sync-delimited")
        );
        assert_eq!(names.last().map(String::as_str), Some("guest-ping"));
        assert!(
            names
                .iter()
                .filter(|n| *n == "guest-sync-delimited")
                .count()
                >= 3
        );
    }

    #[test]
    fn commands_deeper_than_the_agent_accepts_are_refused_before_any_io() {
        let (mut agent, seen) = fake_agent(Box::new(|command| answer(command, json!({}))));
        let mut value = json!([]);
        for _ in 0..1022 {
            value = Value::Array(vec![value]);
        }
        let mut args = Map::new();
        args.insert("a".into(), value);
        match agent.execute("guest-deep", Some(args)) {
            Err(Error::CommandTooDeep {
                command,
                depth: 1025,
                limit: 1024,
            }) => assert_eq!(command, "guest-deep"),
            other => panic!("{other:?}"),
        }
        assert!(!agent.is_synced(), "not even a sync was sent");
        agent.ping().expect("ping");
        assert_eq!(seen.recv().ok().as_deref(), Some("guest-sync-delimited"));
        assert_eq!(seen.recv().ok().as_deref(), Some("guest-ping"));
    }

    #[test]
    fn error_replies_are_typed_and_shutdown_without_reply_is_success() {
        let (mut agent, _seen) = fake_agent(Box::new(|command| {
            match command["execute"].as_str() {
            Some("guest-file-open") => format!(
                "{}\n",
                json!({"error": {"class": "GenericError", "desc": "No such file"}, "id": command["id"]})
            )
            .into_bytes(),
            Some("guest-shutdown") => Vec::new(),
            _ => answer(command, json!({})),
        }
        }));
        let err = agent.read_file("/nonexistent").expect_err("no such file");
        assert!(
            matches!(&err, Error::Command { command, desc, .. } if command == "guest-file-open" && desc == "No such file"),
            "{err:?}"
        );
        agent.config.no_reply_wait = Duration::from_millis(50);
        agent.shutdown("powerdown").expect("silence is success");
        assert!(!agent.is_synced());
    }

    #[test]
    fn exec_decodes_exit_code_and_output() {
        let (mut agent, _seen) = fake_agent(Box::new(|command| {
            match command["execute"].as_str() {
                Some("guest-exec") => answer(command, json!({ "pid": 42 })),
                Some("guest-exec-status") => answer(
                    command,
                    json!({ "exited": true, "exitcode": 3, "out-data": "aGVsbG8K", "err-data": "" }),
                ),
                _ => answer(command, json!({})),
            }
        }));
        let status = agent
            .run(
                "/bin/sh",
                &["-c", "echo hello; exit 3"],
                Duration::from_secs(5),
            )
            .expect("run");
        assert_eq!(status.exit_code, Some(3));
        assert_eq!(status.stdout, b"hello\n");
        assert!(status.stderr.is_empty() && status.exited);
    }

    #[test]
    fn a_closed_channel_is_an_error_not_a_hang() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        drop(theirs);
        let mut agent = Agent::from_unix_stream(ours, &AgentConfig::default()).expect("agent");
        let err = agent.ping().expect_err("peer gone");
        assert!(
            matches!(err, Error::Eof { .. } | Error::Io { .. }),
            "{err:?}"
        );
    }
}
