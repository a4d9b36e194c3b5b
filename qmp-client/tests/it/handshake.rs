//! Fault catalogue section A: greeting, negotiation, connect, accept, path limits, aborts.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use qmp_client::testing::{Action, Script};
use qmp_client::{Connection, Error, Listener, OobPolicy, Phase};
use serde_json::json;

use crate::util::{assert_near, config, connect, connect_with, short_tempdir, timed};

#[test]
fn greeting_and_negotiation_enable_oob_when_offered() {
    let (server, mut conn) = connect(Script::new());
    let greeting = conn.greeting().expect("greeting kept");
    assert_eq!(greeting.version.qemu.major, 7);
    assert!(conn.oob_enabled());
    let sent = server.wait_commands(1, Duration::from_secs(5));
    assert_eq!(sent[0].execute, "qmp_capabilities");
    assert_eq!(
        sent[0].arguments,
        Some(crate::util::args(json!({"enable": ["oob"]})))
    );
}

#[test]
fn oob_not_enabled_when_off_or_not_offered() {
    let (server, conn) = connect_with(Script::new(), &config().with_oob(OobPolicy::Off));
    let mut conn = conn.unwrap();
    assert!(!conn.oob_enabled());
    assert_eq!(
        server.wait_commands(1, Duration::from_secs(5))[0].arguments,
        None
    );

    let greeting = json!({"QMP": {"version": {"qemu": {"major": 9, "minor": 0, "micro": 0}, "package": ""}, "capabilities": []}});
    let (server, mut conn) = connect(Script::new().greeting(greeting));
    assert!(!conn.oob_enabled());
    assert_eq!(
        server.wait_commands(1, Duration::from_secs(5))[0].arguments,
        None
    );
}

#[test]
fn unknown_greeting_keys_are_accepted() {
    let greeting = json!({"QMP": {"version": {"qemu": {"major": 8, "minor": 1, "micro": 0}, "package": "x", "new": 1},
        "capabilities": ["oob", "future-cap"], "extra": {"a": [1]}}, "also": true});
    let (_server, mut conn) = connect(Script::new().greeting(greeting));
    assert_eq!(
        conn.greeting().unwrap().capabilities,
        vec!["oob", "future-cap"]
    );
}

#[test]
fn guest_agent_mode_skips_greeting_and_negotiation() {
    let cfg = config().with_await_greeting(false).with_negotiate(false);
    let script = Script::new()
        .no_greeting()
        .on("guest-ping", vec![Action::reply(json!({}))]);
    let (server, conn) = connect_with(script, &cfg);
    let mut conn = conn.unwrap();
    assert!(conn.greeting().is_none());
    assert_eq!(conn.execute("guest-ping", None).unwrap(), json!({}));
    let sent = server.commands();
    assert_eq!(sent.len(), 1, "no qmp_capabilities: {sent:?}");
}

#[test]
fn negotiation_without_greeting_wait() {
    let cfg = config().with_await_greeting(false);
    let (server, conn) = connect_with(Script::new().no_greeting(), &cfg);
    let mut conn = conn.unwrap();
    assert!(conn.session().is_ready());
    assert_eq!(server.commands()[0].execute, "qmp_capabilities");
}

/// #3: the server dies before the greeting.
#[test]
fn eof_before_greeting() {
    let script = Script::new()
        .no_greeting()
        .before_greeting(vec![Action::Close]);
    let (_server, conn) = connect_with(script, &config());
    match conn {
        Err(Error::Eof {
            phase: Phase::Greeting,
            partial_len: 0,
        }) => {}
        other => panic!("expected Eof in greeting, got {other:?}"),
    }
}

/// #3 with a partial greeting cut by EOF.
#[test]
fn eof_mid_greeting() {
    let script = Script::new().no_greeting().before_greeting(vec![
        Action::raw(&b"{\"QMP\": {\"version\""[..]),
        Action::Close,
    ]);
    let (_server, conn) = connect_with(script, &config());
    match conn {
        Err(Error::Eof {
            phase: Phase::Greeting,
            partial_len,
        }) => assert!(partial_len > 0),
        other => panic!("expected Eof in greeting, got {other:?}"),
    }
}

/// #4: no greeting ever; the timeout fires on time and the socket is closed.
#[test]
fn greeting_timeout_is_accurate_and_closes_the_socket() {
    let (client, mut server_end) = UnixStream::pair().unwrap();
    let timeout = Duration::from_millis(300);
    let cfg = config().with_greeting_timeout(timeout);
    let (res, took) = timed(|| Connection::from_unix_stream(client, &cfg));
    match res {
        Err(Error::GreetingTimeout { timeout: t }) => assert_eq!(t, timeout),
        other => panic!("expected GreetingTimeout, got {other:?}"),
    }
    assert_near(took, timeout);
    // The client's fd is closed: the peer sees EOF, so nothing leaked (#11).
    server_end
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(server_end.read(&mut buf).unwrap(), 0);
}

/// The handshake watches an abort fd (QEMU's pidfd in machine-core): when it turns readable
/// the wait ends at once.
#[test]
fn abort_fd_ends_the_greeting_wait() {
    let (client, _server_end) = UnixStream::pair().unwrap();
    let (abort_rx, mut abort_tx) = UnixStream::pair().unwrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        abort_tx.write_all(b"x").unwrap();
        abort_tx
    });
    let cfg = config().with_greeting_timeout(Duration::from_secs(10));
    let (res, took) =
        timed(|| Connection::from_unix_stream_with_abort(client, &cfg, Some(abort_rx.as_fd())));
    assert!(matches!(res, Err(Error::Aborted)), "{res:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    drop(writer.join());
}

/// #5: malformed greetings are typed errors carrying the bytes.
#[test]
fn malformed_greetings() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not json", b"hello there\r\n".to_vec()),
        ("array", b"[1, 2]\r\n".to_vec()),
        ("missing QMP", b"{\"return\": {}}\r\n".to_vec()),
        (
            "capabilities not an array",
            b"{\"QMP\": {\"version\": {}, \"capabilities\": \"oob\"}}\r\n".to_vec(),
        ),
        (
            "version not an object",
            b"{\"QMP\": {\"version\": 7, \"capabilities\": []}}\r\n".to_vec(),
        ),
        ("invalid utf-8", b"{\"QMP\": \"\xff\"}\r\n".to_vec()),
    ];
    for (name, bytes) in cases {
        let script = Script::new()
            .no_greeting()
            .before_greeting(vec![Action::Raw(bytes)]);
        let (_server, conn) = connect_with(script, &config());
        match conn {
            Err(Error::Greeting { raw, .. }) => assert!(!raw.is_empty(), "{name}"),
            other => panic!("{name}: expected Greeting error, got {other:?}"),
        }
    }
}

/// #6: negotiation failures are NegotiationError with the cause.
#[test]
fn negotiation_failures() {
    let error_reply = Script::new().on(
        "qmp_capabilities",
        vec![Action::error("GenericError", "nope")],
    );
    match connect_with(error_reply, &config()).1 {
        Err(Error::Negotiation { cause }) => {
            assert!(
                matches!(*cause, Error::Command { ref desc, .. } if desc == "nope"),
                "{cause:?}"
            )
        }
        other => panic!("expected Negotiation, got {other:?}"),
    }
    let eof = Script::new().on("qmp_capabilities", vec![Action::Close]);
    match connect_with(eof, &config()).1 {
        Err(Error::Negotiation { cause }) => {
            assert!(matches!(*cause, Error::Eof { .. }), "{cause:?}")
        }
        other => panic!("expected Negotiation, got {other:?}"),
    }
    let garbage = Script::new().on(
        "qmp_capabilities",
        vec![Action::raw(&b"}}garbage{{\r\n"[..])],
    );
    match connect_with(garbage, &config()).1 {
        Err(Error::Negotiation { cause }) => {
            assert!(matches!(*cause, Error::Decode { .. }), "{cause:?}")
        }
        other => panic!("expected Negotiation, got {other:?}"),
    }
    let silent = Script::new().on("qmp_capabilities", vec![]);
    let cfg = config().with_command_timeout(Duration::from_millis(200));
    let (res, took) = timed(|| connect_with(silent, &cfg).1);
    match res {
        Err(Error::Negotiation { cause }) => {
            assert!(matches!(*cause, Error::CommandTimeout { .. }), "{cause:?}")
        }
        other => panic!("expected Negotiation, got {other:?}"),
    }
    assert_near(took, Duration::from_millis(200));
}

/// #7: events before the greeting and between qmp_capabilities and its reply are queued.
#[test]
fn early_events_are_queued_not_taken_as_replies() {
    let script = Script::new()
        .before_greeting(vec![Action::event("EARLY", None)])
        .on(
            "qmp_capabilities",
            vec![
                Action::event("DURING", Some(json!({"n": 1}))),
                Action::reply(json!({})),
            ],
        );
    let (_server, mut conn) = connect(script);
    let names: Vec<String> = conn.drain_events().into_iter().map(|e| e.event).collect();
    assert_eq!(names, ["EARLY", "DURING"]);
}

/// A server that negotiates and closes at once, with the reply, an event and EOF in one read,
/// still completed the handshake: the connection opens, the event is readable, and only the
/// next command sees the disconnect.
#[test]
fn negotiation_reply_event_and_eof_together_still_connect() {
    let script = Script::new().on(
        "qmp_capabilities",
        vec![
            Action::Raw(
                b"{\"return\": {}, \"id\": 1}\r\n{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": false}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n"
                    .to_vec(),
            ),
            Action::Close,
        ],
    );
    let (_server, mut conn) = connect(script);
    let names: Vec<String> = conn.drain_events().into_iter().map(|e| e.event).collect();
    assert_eq!(names, ["SHUTDOWN"]);
    match conn.execute("query-status", None) {
        Err(Error::Disconnected { .. }) => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

/// #8: an overlong unix path is refused before anything is created.
#[test]
fn path_too_long_is_typed_and_creates_nothing() {
    let dir = short_tempdir();
    let path = dir.path().join("x".repeat(120));
    match Connection::connect_unix(&path, &config()) {
        Err(Error::PathTooLong {
            path: p,
            len,
            limit,
        }) => {
            assert_eq!(p, path);
            assert_eq!(limit, 107);
            assert!(len > limit);
        }
        other => panic!("expected PathTooLong, got {other:?}"),
    }
    match Listener::bind_unix(&path) {
        Err(Error::PathTooLong { .. }) => {}
        other => panic!("expected PathTooLong, got {other:?}"),
    }
    assert!(!path.exists());
    let err = Listener::bind_unix(&path).unwrap_err().to_string();
    assert!(err.contains("107") && err.contains("xxxx"), "{err}");
    // Exactly 107 bytes is fine.
    let base = dir.path().as_os_str().len() + 1;
    let ok = dir.path().join("y".repeat(107 - base));
    assert_eq!(ok.as_os_str().len(), 107);
    let listener = Listener::bind_unix(&ok).unwrap();
    assert!(ok.exists());
    drop(listener);
    assert!(!ok.exists(), "the listener removes its socket file");
}

/// #9: an existing path is refused, never replaced.
#[test]
fn bind_refuses_existing_path() {
    let dir = short_tempdir();
    let path = dir.path().join("taken");
    std::fs::write(&path, b"user data").unwrap();
    assert!(matches!(
        Listener::bind_unix(&path),
        Err(Error::Bind { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"user data");
}

/// #10: connect refused (unix and TCP) is a typed error.
#[test]
fn connect_refused() {
    let dir = short_tempdir();
    let missing = dir.path().join("nobody");
    assert!(matches!(
        Connection::connect_unix(&missing, &config()),
        Err(Error::Connect { .. })
    ));
    // A port that was just free: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    match Connection::connect_tcp(port, &config()) {
        Err(Error::Connect { address, .. }) => assert_eq!(address, port.to_string()),
        other => panic!("expected Connect, got {other:?}"),
    }
}

/// Connecting to a unix path served by the fake server.
#[test]
fn connect_unix_path() {
    let dir = short_tempdir();
    let path = dir.path().join("qmp.sock");
    let server = Script::new()
        .on(
            "query-status",
            vec![Action::reply(json!({"status": "running"}))],
        )
        .start_unix(&path)
        .unwrap();
    let mut conn = Connection::connect_unix(&path, &config()).unwrap();
    assert_eq!(
        conn.execute("query-status", None).unwrap()["status"],
        "running"
    );
    drop(server);
}

/// Server mode: we listen, the "QEMU" connects to us; then the listener is gone.
#[test]
fn listener_accepts_one_peer_and_cleans_up() {
    let dir = short_tempdir();
    let path = dir.path().join("qmp.sock");
    let listener = Listener::bind_unix(&path).unwrap();
    assert_eq!(listener.path(), Some(path.as_path()));
    let peer_path = path.clone();
    let peer = std::thread::spawn(move || {
        let stream = UnixStream::connect(&peer_path).unwrap();
        Script::new().start_on(stream).unwrap()
    });
    let mut conn = listener
        .accept(Duration::from_secs(5), None, &config())
        .unwrap();
    let server = peer.join().unwrap();
    assert!(conn.is_connected());
    assert!(!path.exists(), "socket file removed after accept");
    assert!(matches!(
        conn.execute("nope", None),
        Err(Error::Command { ref command, .. }) if command == "nope"
    ));
    drop(server);
}

/// Server mode over TCP.
#[test]
fn tcp_listener_and_connect() {
    let listener = Listener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap();
        let sent = String::from_utf8_lossy(&buf[..n]).into_owned();
        s.write_all(b"{\"return\": {}, \"id\": 1}\r\n").unwrap();
        // Keep the socket open until the client has finished its handshake and closes.
        let mut rest = [0u8; 16];
        let _ = s.read(&mut rest);
        sent
    });
    let mut conn = listener
        .accept(Duration::from_secs(5), None, &config())
        .unwrap();
    assert!(conn.session().is_ready());
    conn.close().unwrap();
    assert_eq!(
        peer.join().unwrap(),
        r#"{"execute":"qmp_capabilities","id":1}"#
    );
}

/// Accept has a deadline and an abort fd.
#[test]
fn accept_timeout_and_abort() {
    let dir = short_tempdir();
    let listener = Listener::bind_unix(&dir.path().join("a.sock")).unwrap();
    let (res, took) = timed(|| listener.accept(Duration::from_millis(200), None, &config()));
    assert!(matches!(res, Err(Error::AcceptTimeout { .. })), "{res:?}");
    assert_near(took, Duration::from_millis(200));

    let listener = Listener::bind_unix(&dir.path().join("b.sock")).unwrap();
    let (abort_rx, abort_tx) = UnixStream::pair().unwrap();
    drop(abort_tx); // EOF: readable at once
    let (res, took) =
        timed(|| listener.accept(Duration::from_secs(10), Some(abort_rx.as_fd()), &config()));
    assert!(matches!(res, Err(Error::Aborted)), "{res:?}");
    assert!(took < Duration::from_secs(1));
}

/// #11: after a failed handshake a new connection works.
#[test]
fn reconnect_after_failed_handshake() {
    let dir = short_tempdir();
    let path = dir.path().join("r.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let cfg = config().with_greeting_timeout(Duration::from_millis(100));
    // The first connection sits in the backlog: no greeting.
    assert!(matches!(
        Connection::connect_unix(&path, &cfg),
        Err(Error::GreetingTimeout { .. })
    ));
    let (first, _) = listener.accept().unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        (&first).read(&mut buf).unwrap(),
        0,
        "timed-out client closed its socket"
    );
    drop(listener);
    std::fs::remove_file(&path).unwrap();
    let server = Script::new().start_unix(&path).unwrap();
    let mut conn = Connection::connect_unix(&path, &config()).unwrap();
    assert!(conn.is_connected());
    drop(server);
}

/// #10: a jammed backlog. Our listener's backlog is 1 (the kernel queues backlog + 1); a
/// further connect is retried until the connect deadline, then ConnectTimeout.
#[test]
fn jammed_backlog_times_out() {
    let dir = short_tempdir();
    let path = dir.path().join("jam.sock");
    let listener = Listener::bind_unix(&path).unwrap();
    let mut queued = Vec::new();
    loop {
        match mio::net::UnixStream::connect(&path) {
            Ok(s) => queued.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("unexpected connect error {e}"),
        }
        assert!(queued.len() < 10, "backlog is not 1");
    }
    assert_eq!(queued.len(), 2, "backlog 1 queues two connections");
    let cfg = config().with_connect_timeout(Duration::from_millis(200));
    let (res, took) = timed(|| Connection::connect_unix(&path, &cfg));
    match res {
        Err(Error::ConnectTimeout { address, timeout }) => {
            assert_eq!(address, path.display().to_string());
            assert_eq!(timeout, Duration::from_millis(200));
        }
        other => panic!("expected ConnectTimeout, got {other:?}"),
    }
    assert_near(took, Duration::from_millis(200));
    drop(listener);
}
