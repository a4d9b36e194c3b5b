//! A scripted fake QMP server for tests of this crate and of its users (feature `testing`).
//!
//! It runs in its own thread on one end of a socketpair (or on a unix path it listens on),
//! sends a configurable greeting, answers each command by name (fixed actions or a closure),
//! and can send events, delays, garbage, oversized lines, a message cut by EOF, or stall. It
//! records every command the client sent and every fd passed to it.
//!
//! ```
//! use qmp_client::testing::{Action, Script};
//! use qmp_client::{Config, Connection};
//! use serde_json::json;
//!
//! let (server, stream) = Script::new()
//!     .on("query-status", vec![
//!         Action::event("STOP", None),
//!         Action::reply(json!({"status": "paused", "running": false})),
//!     ])
//!     .start_pair()
//!     .unwrap();
//! let mut qmp = Connection::from_unix_stream(stream, &Config::default()).unwrap();
//! assert_eq!(qmp.execute("query-status", None).unwrap()["running"], false);
//! assert_eq!(qmp.drain_events()[0].event, "STOP");
//! assert_eq!(server.commands()[1].execute, "query-status");
//! ```

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::debug;
use qmp_proto::{Command, Decoder};
use serde_json::{json, Value};

/// One thing the fake server does.
#[derive(Clone, Debug)]
pub enum Action {
    /// Send this JSON value, compact, terminated by CRLF (as QEMU does).
    Send(Value),
    /// Send these bytes as they are (garbage, partial messages, oversized lines).
    Raw(Vec<u8>),
    /// Reply `{"return": value}` to the command being handled, echoing its id.
    Reply(Value),
    /// Reply `{"error": {"class", "desc"}}` to the command being handled, echoing its id.
    Fail {
        /// The error class.
        class: String,
        /// The description.
        desc: String,
    },
    /// Wait this long (still interruptible by dropping the server).
    Sleep(Duration),
    /// Close the connection (the client sees EOF, or ECONNRESET if it had unread bytes
    /// pending, like QEMU exiting after `quit`) and end the server.
    Close,
    /// Stop reading and writing until the server is dropped.
    Stall,
}

impl Action {
    /// An event message with the current time as timestamp.
    pub fn event(name: &str, data: Option<Value>) -> Action {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut event = json!({
            "event": name,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        if let (Some(data), Some(obj)) = (data, event.as_object_mut()) {
            obj.insert("data".into(), data);
        }
        Action::Send(event)
    }

    /// [`Action::Reply`].
    pub fn reply(value: Value) -> Action {
        Action::Reply(value)
    }

    /// [`Action::Fail`].
    pub fn error(class: &str, desc: &str) -> Action {
        Action::Fail {
            class: class.into(),
            desc: desc.into(),
        }
    }

    /// [`Action::Raw`].
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Action {
        Action::Raw(bytes.into())
    }
}

/// A closure answering a command with actions.
pub type Handler = Box<dyn FnMut(&Command) -> Vec<Action> + Send>;

/// The greeting QEMU 7.2 sends, offering `oob`.
pub fn qemu_greeting() -> Value {
    json!({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7},
        "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}})
}

/// What the fake server should do, built step by step, then started.
pub struct Script {
    before_greeting: Vec<Action>,
    greeting: Option<Value>,
    after_greeting: Vec<Action>,
    handlers: HashMap<String, Handler>,
    fallback: Option<Handler>,
    read_limit: Option<(usize, Duration)>,
}

impl Default for Script {
    fn default() -> Self {
        Script::new()
    }
}

impl Script {
    /// QEMU-like defaults: greeting offering `oob`, `qmp_capabilities` answered `{}`, any
    /// other command answered with `CommandNotFound`.
    pub fn new() -> Script {
        Script {
            before_greeting: Vec::new(),
            greeting: Some(qemu_greeting()),
            after_greeting: Vec::new(),
            handlers: HashMap::new(),
            fallback: None,
            read_limit: None,
        }
    }

    /// Replaces the greeting.
    pub fn greeting(mut self, greeting: Value) -> Script {
        self.greeting = Some(greeting);
        self
    }

    /// Sends no greeting at all.
    pub fn no_greeting(mut self) -> Script {
        self.greeting = None;
        self
    }

    /// Actions run before the greeting (events, garbage, a stall...).
    pub fn before_greeting(mut self, actions: Vec<Action>) -> Script {
        self.before_greeting = actions;
        self
    }

    /// Actions run right after the greeting, before any command is read.
    pub fn after_greeting(mut self, actions: Vec<Action>) -> Script {
        self.after_greeting = actions;
        self
    }

    /// Answers every `name` command with `actions`.
    pub fn on(self, name: &str, actions: Vec<Action>) -> Script {
        self.on_fn(name, move |_| actions.clone())
    }

    /// Answers every `name` command with what `handler` returns.
    pub fn on_fn(
        mut self,
        name: &str,
        handler: impl FnMut(&Command) -> Vec<Action> + Send + 'static,
    ) -> Script {
        self.handlers.insert(name.into(), Box::new(handler));
        self
    }

    /// Answers commands without a handler (default: `CommandNotFound`).
    pub fn fallback(
        mut self,
        handler: impl FnMut(&Command) -> Vec<Action> + Send + 'static,
    ) -> Script {
        self.fallback = Some(Box::new(handler));
        self
    }

    /// Reads at most `bytes` per `interval`: a slow peer, for partial-write tests.
    pub fn read_slowly(mut self, bytes: usize, interval: Duration) -> Script {
        self.read_limit = Some((bytes.max(1), interval));
        self
    }

    /// Starts the server on one end of a new socketpair; returns it and the client's end.
    pub fn start_pair(self) -> io::Result<(FakeServer, UnixStream)> {
        let (client, server) = UnixStream::pair()?;
        Ok((
            FakeServer::spawn(self, Endpoint::Stream(server), None)?,
            client,
        ))
    }

    /// Starts the server on an already connected socket (e.g. one that connected to a
    /// [`crate::Listener`], playing QEMU in client mode).
    pub fn start_on(self, stream: UnixStream) -> io::Result<FakeServer> {
        FakeServer::spawn(self, Endpoint::Stream(stream), None)
    }

    /// Starts the server listening on the unix socket `path`; it serves the first client that
    /// connects. The socket file is removed when the server is dropped.
    pub fn start_unix(self, path: &Path) -> io::Result<FakeServer> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        FakeServer::spawn(self, Endpoint::Listener(listener), Some(path.to_owned()))
    }
}

enum Endpoint {
    Stream(UnixStream),
    Listener(UnixListener),
}

#[derive(Default)]
struct Record {
    commands: Vec<Command>,
    received: Vec<u8>,
    fds: Vec<(usize, OwnedFd)>,
    finished: bool,
}

struct Shared {
    record: Mutex<Record>,
    cond: Condvar,
}

impl Shared {
    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake QMP server. Dropping it stops the thread (waking any stall or delay) and
/// joins it.
pub struct FakeServer {
    thread: Option<JoinHandle<()>>,
    stop: Option<UnixStream>,
    inject: mpsc::Sender<Vec<Action>>,
    shared: Arc<Shared>,
    path: Option<PathBuf>,
}

impl FakeServer {
    fn spawn(script: Script, endpoint: Endpoint, path: Option<PathBuf>) -> io::Result<FakeServer> {
        let (stop, stop_rx) = UnixStream::pair()?;
        let (inject, inject_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            record: Mutex::new(Record::default()),
            cond: Condvar::new(),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("fake-qmp".into())
            .spawn(move || {
                let mut worker = Worker {
                    script,
                    ctl: stop_rx,
                    inject: inject_rx,
                    shared: Arc::clone(&thread_shared),
                    sock: None,
                    decoder: Decoder::new(),
                };
                if let Err(e) = worker.run(endpoint) {
                    debug!("fake QMP server ended: {e}");
                }
                thread_shared.record().finished = true;
                thread_shared.cond.notify_all();
            })?;
        Ok(FakeServer {
            thread: Some(thread),
            stop: Some(stop),
            inject,
            shared,
            path,
        })
    }

    /// The unix path it listens on, if started with [`Script::start_unix`].
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Runs `actions` as soon as the server is idle (e.g. to send events mid-session).
    pub fn inject(&self, actions: Vec<Action>) {
        if self.inject.send(actions).is_ok() {
            if let Some(mut stop) = self.stop.as_ref() {
                // A byte on the control socket wakes the server's poll.
                let _ = stop.write_all(b"i");
            }
        }
    }

    /// Every command received so far, in order.
    pub fn commands(&self) -> Vec<Command> {
        self.shared.record().commands.clone()
    }

    /// Waits until `n` commands were received (or the server ended, or `timeout`); returns
    /// those received.
    pub fn wait_commands(&self, n: usize, timeout: Duration) -> Vec<Command> {
        let deadline = Instant::now() + timeout;
        let mut record = self.shared.record();
        while record.commands.len() < n && !record.finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            record = self
                .shared
                .cond
                .wait_timeout(record, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        record.commands.clone()
    }

    /// Every byte received so far (fd-carrying bytes included).
    pub fn received(&self) -> Vec<u8> {
        self.shared.record().received.clone()
    }

    /// Takes the fds received so far with SCM_RIGHTS.
    pub fn take_fds(&self) -> Vec<OwnedFd> {
        self.take_fds_with_position()
            .into_iter()
            .map(|(_, fd)| fd)
            .collect()
    }

    /// Takes the fds received so far, each with the number of commands received before it
    /// (so `commands()[position]` is the command that followed the fd).
    pub fn take_fds_with_position(&self) -> Vec<(usize, OwnedFd)> {
        std::mem::take(&mut self.shared.record().fds)
    }

    /// True once the server thread has ended (after [`Action::Close`] or the client left).
    pub fn finished(&self) -> bool {
        self.shared.record().finished
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        // Closing the control socket wakes the thread wherever it waits.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[derive(Debug)]
enum Stop {
    Stopped,
    Closed,
    Io(io::Error),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Stopped => f.write_str("stopped"),
            Stop::Closed => f.write_str("connection closed"),
            Stop::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Io(e)
    }
}

struct Worker {
    script: Script,
    ctl: UnixStream,
    inject: mpsc::Receiver<Vec<Action>>,
    shared: Arc<Shared>,
    sock: Option<UnixStream>,
    decoder: Decoder,
}

enum Ready {
    Socket,
    Control,
    Timeout,
}

impl Worker {
    fn run(&mut self, endpoint: Endpoint) -> Result<(), Stop> {
        let sock = match endpoint {
            Endpoint::Stream(s) => s,
            Endpoint::Listener(l) => self.accept(&l)?,
        };
        sock.set_nonblocking(true)?;
        self.sock = Some(sock);
        let before = std::mem::take(&mut self.script.before_greeting);
        self.perform(before, None)?;
        if let Some(greeting) = self.script.greeting.clone() {
            self.perform(vec![Action::Send(greeting)], None)?;
        }
        let after = std::mem::take(&mut self.script.after_greeting);
        self.perform(after, None)?;
        self.serve()
    }

    fn accept(&mut self, listener: &UnixListener) -> Result<UnixStream, Stop> {
        loop {
            match listener.accept() {
                Ok((s, _)) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            if let Ready::Control = self.wait(listener.as_fd(), false, None)? {
                self.control()?;
            }
        }
    }

    fn sock(&self) -> Result<&UnixStream, Stop> {
        self.sock.as_ref().ok_or(Stop::Closed)
    }

    /// Waits for `fd` to be writable (`write`) or readable, or for the control socket, up to
    /// `timeout`.
    fn wait(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        write: bool,
        timeout: Option<Duration>,
    ) -> Result<Ready, Stop> {
        let ready = loop {
            match crate::sys::poll_ready(&[(fd, write), (self.ctl.as_fd(), false)], timeout) {
                Ok(ready) => break ready,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Stop::Io(e)),
            }
        };
        if ready.get(1) == Some(&true) {
            return Ok(Ready::Control);
        }
        if ready.first() == Some(&true) {
            return Ok(Ready::Socket);
        }
        Ok(Ready::Timeout)
    }

    /// Handles the control socket: injected actions, or the stop request (EOF).
    fn control(&mut self) -> Result<(), Stop> {
        let mut byte = [0u8; 64];
        match (&self.ctl).read(&mut byte) {
            Ok(0) => Err(Stop::Stopped),
            Ok(_) => {
                while let Ok(actions) = self.inject.try_recv() {
                    self.perform(actions, None)?;
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(_) => Err(Stop::Stopped),
        }
    }

    fn serve(&mut self) -> Result<(), Stop> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let ready = {
                let sock = self.sock()?;
                self.wait(sock.as_fd(), false, None)?
            };
            match ready {
                Ready::Control => self.control()?,
                Ready::Timeout => {}
                Ready::Socket => {
                    let limit = match self.script.read_limit {
                        Some((bytes, interval)) => {
                            self.sleep(interval)?;
                            bytes.min(buf.len())
                        }
                        None => buf.len(),
                    };
                    let mut fds = Vec::new();
                    let n = {
                        let sock = self.sock()?;
                        let n = match crate::sys::recv_with_fds(
                            sock.as_fd(),
                            &mut buf[..limit],
                            &mut fds,
                        ) {
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e.into()),
                        };
                        self.shared.record().received.extend_from_slice(&buf[..n]);
                        n
                    };
                    if n == 0 {
                        return Err(Stop::Closed);
                    }
                    self.decoder.feed(&buf[..n]);
                    while let Some(object) = self.decoder.next_object() {
                        match object {
                            Ok(map) => match Command::from_object(map) {
                                Ok(cmd) => self.handle(cmd)?,
                                Err(e) => self.perform(
                                    vec![Action::error("GenericError", &e.to_string())],
                                    None,
                                )?,
                            },
                            Err(e) => self.perform(
                                vec![Action::error("GenericError", &e.to_string())],
                                None,
                            )?,
                        }
                    }
                    // The kernel ends a read right after a chunk carrying fds, so they belong
                    // after every command completed in this read (and before the next one).
                    if !fds.is_empty() {
                        let mut record = self.shared.record();
                        let position = record.commands.len();
                        record.fds.extend(fds.into_iter().map(|fd| (position, fd)));
                    }
                }
            }
        }
    }

    fn handle(&mut self, cmd: Command) -> Result<(), Stop> {
        {
            let mut record = self.shared.record();
            record.commands.push(cmd.clone());
        }
        self.shared.cond.notify_all();
        let actions = if let Some(handler) = self.script.handlers.get_mut(&cmd.execute) {
            handler(&cmd)
        } else if let Some(fallback) = self.script.fallback.as_mut() {
            fallback(&cmd)
        } else if cmd.execute == "qmp_capabilities" {
            vec![Action::reply(json!({}))]
        } else {
            vec![Action::error(
                "CommandNotFound",
                &format!("The command {} has not been found", cmd.execute),
            )]
        };
        self.perform(actions, cmd.id.as_ref())
    }

    fn perform(&mut self, actions: Vec<Action>, id: Option<&Value>) -> Result<(), Stop> {
        for action in actions {
            match action {
                Action::Send(value) => self.send_value(value)?,
                Action::Raw(bytes) => self.write_all(&bytes)?,
                Action::Reply(ret) => {
                    let mut msg = json!({ "return": ret });
                    if let (Some(id), Some(obj)) = (id, msg.as_object_mut()) {
                        obj.insert("id".into(), id.clone());
                    }
                    self.send_value(msg)?;
                }
                Action::Fail { class, desc } => {
                    let mut msg = json!({ "error": {"class": class, "desc": desc} });
                    if let (Some(id), Some(obj)) = (id, msg.as_object_mut()) {
                        obj.insert("id".into(), id.clone());
                    }
                    self.send_value(msg)?;
                }
                Action::Sleep(d) => self.sleep(d)?,
                Action::Close => {
                    self.sock = None;
                    return Err(Stop::Closed);
                }
                Action::Stall => loop {
                    // Only the control socket matters now; injected actions are ignored.
                    let mut byte = [0u8; 64];
                    match (&self.ctl).read(&mut byte) {
                        Ok(0) | Err(_) => return Err(Stop::Stopped),
                        Ok(_) => {}
                    }
                },
            }
        }
        Ok(())
    }

    fn sleep(&mut self, d: Duration) -> Result<(), Stop> {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            let wait = left.max(Duration::from_millis(1));
            match crate::sys::poll_ready(&[(self.ctl.as_fd(), false)], Some(wait)) {
                Ok(ready) if ready.first() != Some(&true) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(_) => {
                    // Injected actions wait until the delay is over; EOF means stop.
                    let mut byte = [0u8; 64];
                    if let Ok(0) | Err(_) = (&self.ctl).read(&mut byte) {
                        return Err(Stop::Stopped);
                    }
                }
                Err(e) => return Err(Stop::Io(e)),
            }
        }
    }

    fn send_value(&mut self, value: Value) -> Result<(), Stop> {
        let mut bytes = serde_json::to_vec(&value).map_err(|e| Stop::Io(e.into()))?;
        bytes.extend_from_slice(b"\r\n");
        self.write_all(&bytes)
    }

    fn write_all(&mut self, mut bytes: &[u8]) -> Result<(), Stop> {
        while !bytes.is_empty() {
            let written = {
                let mut sock = self.sock()?;
                sock.write(bytes)
            };
            match written {
                Ok(0) => return Err(Stop::Closed),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let ready = {
                        let sock = self.sock()?;
                        self.wait(sock.as_fd(), true, None)?
                    };
                    if let Ready::Control = ready {
                        let mut byte = [0u8; 64];
                        if let Ok(0) | Err(_) = (&self.ctl).read(&mut byte) {
                            return Err(Stop::Stopped);
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
