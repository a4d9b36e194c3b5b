//! The QMP multiplexer over real sockets: a fake QEMU, an owner's poll loop with its own
//! commands, and clients (our `Connection` and raw sockets) attached through the shared socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use qmp_client::testing::{Action, FakeServer, Script};
use qmp_client::{
    Config, Connection, Error, Mux, MuxConfig, MuxServer, MuxStats, QuitPolicy, ShareAddress,
};
use qmp_proto::{Command, EventFilter};
use serde_json::{json, Value};

/// The owner: one thread, one `mio::Poll`, its own connection to the fake QEMU, the shared
/// monitor, and a `query-status` of its own in flight whenever none is.
struct Owner {
    stop: Arc<AtomicBool>,
    owner_replies: Arc<AtomicU64>,
    thread: Option<JoinHandle<Outcome>>,
    path: PathBuf,
    tcp: Option<std::net::SocketAddr>,
}

struct Outcome {
    stats: MuxStats,
    quit_by: Option<String>,
    owner_errors: Vec<String>,
    session_closed: bool,
}

const SERVER_BASE: Token = Token(10);
const QMP: Token = Token(0);

impl Owner {
    fn start(script: Script, config: MuxConfig, address: ShareAddress) -> (FakeServer, Owner) {
        let (fake, stream) = script.start_pair().expect("test setup");
        let mut conn =
            Connection::from_unix_stream(stream, &Config::default()).expect("test setup");
        let mux = Mux::for_session(&mut conn.session_mut(), config).expect("test setup");
        let server = MuxServer::bind(mux, &address).expect("test setup");
        let path = server.path().to_owned();
        let tcp = server.tcp_addr();
        let stop = Arc::new(AtomicBool::new(false));
        let owner_replies = Arc::new(AtomicU64::new(0));
        let thread = {
            let stop = stop.clone();
            let replies = owner_replies.clone();
            std::thread::spawn(move || run_owner(conn, server, &stop, &replies))
        };
        (
            fake,
            Owner {
                stop,
                owner_replies,
                thread: Some(thread),
                path,
                tcp,
            },
        )
    }

    fn finish(mut self) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("test setup")
            .join()
            .expect("test setup")
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_owner(
    mut conn: Connection,
    mut server: MuxServer,
    stop: &AtomicBool,
    replies: &AtomicU64,
) -> Outcome {
    let mut poll = Poll::new().expect("test setup");
    let mut events = Events::with_capacity(64);
    let fd = conn.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&fd), QMP, Interest::READABLE)
        .expect("test setup");
    server
        .register(poll.registry(), SERVER_BASE)
        .expect("test setup");
    let mut mine = None;
    let mut owner_errors = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let timeout = if server.wants_pump(&conn.session()) || conn.wants_read() {
            Duration::ZERO
        } else {
            Duration::from_millis(5)
        };
        poll.poll(&mut events, Some(timeout)).expect("test setup");
        for event in events.iter() {
            if server.owns(event.token()) {
                server.handle(poll.registry(), event);
            }
        }
        let open = conn.process_io().is_ok();
        server.pump(poll.registry(), &mut conn.session_mut());
        // The owner's own command keeps going through the same session.
        let mut session = conn.session_mut();
        if let Some(id) = mine {
            if let Some(reply) = session.take_reply(id) {
                match reply {
                    Ok(_) => {
                        replies.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => owner_errors.push(e.to_string()),
                }
                mine = None;
            }
        }
        if mine.is_none() && open && session.is_ready() {
            match session.send(Command::new("query-status")) {
                Ok(id) => mine = Some(id),
                Err(e) => owner_errors.push(e.to_string()),
            }
        }
        drop(session);
        let _ = conn.process_io();
        if !open && server.mux().client_count() == 0 {
            break;
        }
    }
    let outcome = Outcome {
        stats: server.stats(),
        quit_by: server.mux().quit_by().map(|c| c.to_string()),
        owner_errors,
        session_closed: !conn.is_connected(),
    };
    server.shutdown(poll.registry());
    outcome
}

/// A fake QEMU echoing every command's name (the owner's `query-status` included), and
/// answering `stop` with STOP before the reply (as QEMU does).
fn echo_script() -> Script {
    let stop = vec![Action::event("STOP", None), Action::reply(json!({}))];
    Script::new()
        .on("stop", stop)
        .fallback(|cmd| vec![Action::reply(json!({"echo": cmd.execute}))])
}

fn client(path: &Path) -> Connection {
    Connection::connect_unix(path, &Config::default()).expect("test setup")
}

/// A raw client that has read the greeting and negotiated.
fn raw_client(path: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let stream = UnixStream::connect(path).expect("test setup");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("test setup");
    let mut reader = BufReader::new(stream.try_clone().expect("test setup"));
    let greeting = read_json(&mut reader);
    assert!(greeting.get("QMP").is_some(), "{greeting}");
    let mut writer = stream;
    writer
        .write_all(br#"{"execute":"qmp_capabilities"}"#)
        .expect("test setup");
    assert_eq!(read_json(&mut reader), json!({"return": {}}));
    (writer, reader)
}

fn read_json(reader: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    reader.read_line(&mut line).expect("test setup");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn clients_with_the_same_ids_get_their_own_replies_and_every_event() {
    let (_fake, owner) = Owner::start(echo_script(), MuxConfig::default(), ShareAddress::default());
    let dir = owner.path.parent().unwrap().to_owned();
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the private directory is private");
    let mut a = client(&owner.path);
    let mut b = client(&owner.path);
    assert_eq!(a.greeting().unwrap().version.qemu.to_string(), "7.2.22");
    assert!(a.oob_enabled(), "the same capabilities as QEMU");
    // Both clients number their commands 1, 2, 3...: the ids collide on purpose.
    let threads: Vec<_> = [a.execute("first-a", None), b.execute("first-b", None)]
        .into_iter()
        .collect();
    assert_eq!(threads[0].as_ref().unwrap()["echo"], "first-a");
    assert_eq!(threads[1].as_ref().unwrap()["echo"], "first-b");
    let handle = std::thread::spawn(move || {
        for i in 0..50 {
            let name = format!("b-{i}");
            assert_eq!(b.execute(&name, None).unwrap()["echo"], name.as_str());
        }
        b
    });
    for i in 0..50 {
        let name = format!("a-{i}");
        assert_eq!(a.execute(&name, None).unwrap()["echo"], name.as_str());
    }
    let mut b = handle.join().unwrap();
    // `stop` from one client: both see STOP, the sender before its reply.
    let (_, event) = a
        .execute_and_wait(
            "stop",
            None,
            &[EventFilter::new("STOP")],
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(event.event, "STOP");
    let seen = b
        .wait_event(&[EventFilter::new("STOP")], Duration::from_secs(5))
        .unwrap();
    assert_eq!(seen.event, "STOP");
    let owner_replies = owner.owner_replies.clone();
    wait_until("the owner's own commands", || {
        owner_replies.load(Ordering::SeqCst) > 3
    });
    drop((a, b));
    let path = owner.path.clone();
    let outcome = owner.finish();
    assert!(
        outcome.owner_errors.is_empty(),
        "{:?}",
        outcome.owner_errors
    );
    assert_eq!(outcome.stats.clients_accepted, 2);
    assert!(outcome.stats.commands_forwarded >= 103);
    // Dropping the server removed the socket and its private directory.
    assert!(!path.exists());
    assert!(!dir.exists());
}

#[test]
fn garbage_gets_qemus_reply_and_only_its_sender_sees_it() {
    let (_fake, owner) = Owner::start(echo_script(), MuxConfig::default(), ShareAddress::default());
    let (mut bad, mut bad_reader) = raw_client(&owner.path);
    let mut good = client(&owner.path);
    bad.write_all(b"garbage\n{\"execute\":\"x\",\"foo\":1,\"id\":[1,{\"a\":null}]}")
        .unwrap();
    assert_eq!(
        read_json(&mut bad_reader),
        json!({"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'garbage'"}})
    );
    assert_eq!(
        read_json(&mut bad_reader),
        json!({"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}, "id": [1, {"a": null}]})
    );
    // Ids of any JSON type come back as sent; no id, no id.
    bad.write_all(r#"{"execute":"y","id":{"deep":[1.5,"é",null]}}{"execute":"z"}"#.as_bytes())
        .unwrap();
    assert_eq!(
        read_json(&mut bad_reader),
        json!({"return": {"echo": "y"}, "id": {"deep": [1.5, "é", null]}})
    );
    assert_eq!(read_json(&mut bad_reader), json!({"return": {"echo": "z"}}));
    assert_eq!(
        good.execute("still-fine", None).unwrap()["echo"],
        "still-fine"
    );
    assert_eq!(good.unknown_replies(), 0);
    assert!(good.drain_events().is_empty());
}

#[test]
fn a_client_that_never_reads_is_dropped_with_bounded_memory() {
    let limit = 64 * 1024;
    let (fake, owner) = Owner::start(
        echo_script(),
        MuxConfig::default().with_max_queued_bytes(limit),
        ShareAddress::default(),
    );
    let (_sleeper, _sleeper_reader) = raw_client(&owner.path);
    let mut reader = client(&owner.path);
    // Enough events to fill the sleeper's socket buffers and then its queue, in bursts the
    // reading client keeps up with (a burst larger than its queue would drop it too).
    let data = json!({"pad": "x".repeat(1000)});
    for _ in 0..40 {
        fake.inject(
            (0..40)
                .map(|_| Action::event("BIG", Some(data.clone())))
                .collect(),
        );
        for _ in 0..40 {
            reader
                .wait_event(&[EventFilter::new("BIG")], Duration::from_secs(10))
                .unwrap();
        }
    }
    assert_eq!(reader.execute("after", None).unwrap()["echo"], "after");
    let outcome = owner.finish();
    assert_eq!(outcome.stats.clients_overflowed, 1);
    assert!(
        outcome.owner_errors.is_empty(),
        "{:?}",
        outcome.owner_errors
    );
}

#[test]
fn a_client_gone_mid_command_has_its_late_reply_dropped() {
    let script = echo_script().on(
        "slow",
        vec![
            Action::Sleep(Duration::from_millis(200)),
            Action::reply(json!({})),
        ],
    );
    let (_fake, owner) = Owner::start(script, MuxConfig::default(), ShareAddress::default());
    let (mut gone, _reader) = raw_client(&owner.path);
    gone.write_all(br#"{"execute":"slow","id":1}"#).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop((gone, _reader));
    let mut other = client(&owner.path);
    assert_eq!(other.execute("next", None).unwrap()["echo"], "next");
    let outcome = owner.finish();
    assert_eq!(outcome.stats.late_replies_dropped, 1);
}

#[test]
fn quit_refused_by_default_and_allowed_quit_names_the_client() {
    let quit = Script::new().on("quit", vec![Action::event("SHUTDOWN", None), Action::Close]);
    let (_fake, owner) = Owner::start(quit, MuxConfig::default(), ShareAddress::default());
    let mut c = client(&owner.path);
    match c.execute("quit", None) {
        Err(Error::Command { desc, .. }) => assert!(desc.contains("refused"), "{desc}"),
        other => panic!("{other:?}"),
    }
    drop(owner);

    let quit = Script::new().on("quit", vec![Action::event("SHUTDOWN", None), Action::Close]);
    let (_fake, owner) = Owner::start(
        quit,
        MuxConfig::default().with_quit(QuitPolicy::Allow),
        ShareAddress::default(),
    );
    let mut c = client(&owner.path);
    c.execute("quit", None).unwrap();
    let mut c2 = client_after_close(&owner.path);
    let outcome = owner.finish();
    assert!(outcome.session_closed);
    let by = outcome.quit_by.unwrap();
    assert!(by.starts_with("QMP client 1 (unix pid "), "{by}");
    // A client connecting after QEMU's side closed is told so (or finds the listener gone),
    // and is not left hanging.
    if let Some(c2) = &mut c2 {
        let mut rest = String::new();
        let _ = c2.read_to_string(&mut rest);
        assert!(
            rest.is_empty() || rest.contains("QEMU's monitor is closed"),
            "{rest}"
        );
    }
}

/// Connects once more if the socket still exists (it may already be gone).
fn client_after_close(path: &Path) -> Option<UnixStream> {
    UnixStream::connect(path).ok().inspect(|s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    })
}

#[test]
fn a_user_path_replaces_only_a_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, b"user data").unwrap();
    let (fake, stream) = echo_script().start_pair().unwrap();
    let mut conn = Connection::from_unix_stream(stream, &Config::default()).unwrap();
    let mux1 = Mux::for_session(&mut conn.session_mut(), MuxConfig::default()).unwrap();
    match MuxServer::bind(mux1, &ShareAddress::unix(&file)) {
        Err(Error::NotASocket { path }) => assert_eq!(path, file),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"user data");
    // A live socket is refused.
    let live = dir.path().join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let mux2 = Mux::for_session(&mut conn.session_mut(), MuxConfig::default()).unwrap();
    assert!(matches!(
        MuxServer::bind(mux2, &ShareAddress::unix(&live)),
        Err(Error::SocketInUse { .. })
    ));
    // A stale one (its listener gone) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mux3 = Mux::for_session(&mut conn.session_mut(), MuxConfig::default()).unwrap();
    let server = MuxServer::bind(mux3, &ShareAddress::unix(&stale)).unwrap();
    let mode = std::fs::metadata(&stale).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(server);
    assert!(!stale.exists(), "removed with the server");
    // TCP only on loopback.
    let mux4 = Mux::for_session(&mut conn.session_mut(), MuxConfig::default()).unwrap();
    let any: std::net::SocketAddr = "0.0.0.0:0".parse().unwrap();
    assert!(matches!(
        MuxServer::bind(mux4, &ShareAddress::default().with_tcp(any)),
        Err(Error::NotLoopback { .. })
    ));
    drop(fake);
}

#[test]
fn tcp_clients_share_too() {
    let (_fake, owner) = Owner::start(
        echo_script(),
        MuxConfig::default(),
        ShareAddress::default().with_tcp("127.0.0.1:0".parse().unwrap()),
    );
    let addr = owner.tcp.unwrap();
    let mut c = Connection::connect_tcp(addr, &Config::default()).unwrap();
    assert_eq!(c.execute("over-tcp", None).unwrap()["echo"], "over-tcp");
}
