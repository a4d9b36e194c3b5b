//! Commands: ids, routing, pipelining, the in-flight limit, timeouts, quit, sticky errors
//! (catalogue #14-#16, #23, #26 and the quit rules).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qmp_client::testing::{Action, Script};
use qmp_client::{Config, Connection, Error, MAX_IN_FLIGHT};
use qmp_proto::{Command, ErrorClass, ServerMessage};
use serde_json::{json, Value};

use crate::util::{args, assert_near, config, connect, connect_with, timed};

#[test]
fn execute_returns_value_and_typed_errors() {
    let script = Script::new()
        .on(
            "query-status",
            vec![Action::reply(json!({"status": "running", "running": true}))],
        )
        .on("query-list", vec![Action::reply(json!([1, 2, 3]))])
        .on(
            "device_del",
            vec![Action::error("DeviceNotFound", "Device 'x' not found")],
        );
    let (_server, mut conn) = connect(script);
    assert_eq!(conn.execute("query-status", None).unwrap()["running"], true);
    assert_eq!(conn.execute("query-list", None).unwrap(), json!([1, 2, 3]));
    match conn.execute("device_del", Some(args(json!({"id": "x"})))) {
        Err(Error::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "device_del");
            assert_eq!(class, ErrorClass::DeviceNotFound);
            assert_eq!(desc, "Device 'x' not found");
        }
        other => panic!("expected Command error, got {other:?}"),
    }
    // The raw variant returns the error reply as data.
    match conn.execute_raw("device_del", None).unwrap() {
        ServerMessage::Error(e) => assert_eq!(e.error.class, ErrorClass::DeviceNotFound),
        other => panic!("expected an error reply, got {other:?}"),
    }
    assert!(conn.is_connected());
}

/// Ids are small integers; each message goes out compact, without a newline.
#[test]
fn wire_format_is_compact_with_small_ids() {
    let script = Script::new().on("query-status", vec![Action::reply(json!({}))]);
    let (server, mut conn) = connect(script);
    conn.execute("query-status", None).unwrap();
    conn.execute("query-status", Some(args(json!({})))).unwrap();
    let sent = String::from_utf8(server.received()).unwrap();
    assert_eq!(
        sent,
        concat!(
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":1}"#,
            r#"{"execute":"query-status","id":2}"#,
            r#"{"execute":"query-status","id":3}"#,
        )
    );
}

/// Pipelining: several commands in flight, replies collected in any order.
#[test]
fn pipelined_commands_get_their_own_replies() {
    let script = Script::new().on_fn("echo", |cmd| vec![Action::reply(json!(cmd.arguments))]);
    let (_server, mut conn) = connect(script);
    let ids: Vec<_> = (0..5)
        .map(|i| {
            conn.send(Command::new("echo").with_arguments(args(json!({"n": i}))))
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    for (i, id) in ids.iter().enumerate().rev() {
        match conn.wait_reply(*id, deadline).unwrap() {
            ServerMessage::Return(r) => assert_eq!(r.ret, json!({"n": i})),
            other => panic!("{other:?}"),
        }
    }
    // A finished id is not pending any more.
    assert!(matches!(
        conn.wait_reply(ids[0], deadline),
        Err(Error::UnknownRequest { .. })
    ));
}

/// At most 8 in-band commands in flight; the 9th waits for a slot within its deadline.
#[test]
fn in_flight_limit_is_eight() {
    let held: Arc<Mutex<Vec<Value>>> = Arc::default();
    let held2 = Arc::clone(&held);
    let script = Script::new()
        .on_fn("hold", move |cmd| {
            held2.lock().unwrap().push(cmd.id.clone().unwrap());
            vec![]
        })
        .on("release", vec![]);
    let (server, mut conn) = connect(script);
    let ids: Vec<_> = (0..MAX_IN_FLIGHT)
        .map(|_| conn.send(Command::new("hold")).unwrap())
        .collect();
    assert_eq!(conn.session().in_flight(), MAX_IN_FLIGHT);
    // The 9th cannot be sent: it times out waiting for a slot, and was never written.
    let (res, took) = timed(|| conn.execute_with_timeout("hold", None, Duration::from_millis(200)));
    assert!(
        matches!(res, Err(Error::CommandTimeout { ref command, .. }) if command == "hold"),
        "{res:?}"
    );
    assert_near(took, Duration::from_millis(200));
    assert_eq!(
        server
            .wait_commands(1 + MAX_IN_FLIGHT, Duration::from_secs(5))
            .len(),
        1 + MAX_IN_FLIGHT
    );
    // Release one: its reply frees a slot.
    let first = held.lock().unwrap()[0].clone();
    server.inject(vec![Action::Send(json!({"return": {}, "id": first}))]);
    conn.wait_reply(ids[0], Instant::now() + Duration::from_secs(5))
        .unwrap();
    assert_eq!(conn.session().in_flight(), MAX_IN_FLIGHT - 1);
    conn.send(Command::new("release")).unwrap();
    assert_eq!(
        server
            .wait_commands(2 + MAX_IN_FLIGHT, Duration::from_secs(5))
            .len(),
        2 + MAX_IN_FLIGHT
    );
}

/// exec-oob replies may overtake in-band ones; each still reaches its caller.
#[test]
fn oob_reply_overtakes_inband() {
    let held: Arc<Mutex<Option<Value>>> = Arc::default();
    let held2 = Arc::clone(&held);
    let held3 = Arc::clone(&held);
    let script = Script::new()
        .on_fn("slow", move |cmd| {
            *held2.lock().unwrap() = cmd.id.clone();
            vec![]
        })
        .on_fn("fast", move |cmd| {
            assert!(cmd.oob, "sent as exec-oob");
            let slow = held3.lock().unwrap().clone();
            vec![
                Action::reply(json!("fast")),
                Action::Send(json!({"return": "slow", "id": slow})),
            ]
        });
    let (server, mut conn) = connect(script);
    let slow = conn.send(Command::new("slow")).unwrap();
    assert_eq!(conn.execute_oob("fast", None).unwrap(), json!("fast"));
    match conn
        .wait_reply(slow, Instant::now() + Duration::from_secs(5))
        .unwrap()
    {
        ServerMessage::Return(r) => assert_eq!(r.ret, json!("slow")),
        other => panic!("{other:?}"),
    }
    assert!(String::from_utf8(server.received())
        .unwrap()
        .contains(r#"{"exec-oob":"fast","id":3}"#));
}

/// #14 and #23: unknown ids (and ids of another JSON type) are dropped and counted.
#[test]
fn unknown_ids_are_dropped_and_counted() {
    let script = Script::new().on_fn("q", |cmd| {
        let id = cmd.id.clone().unwrap();
        vec![
            Action::Send(json!({"return": "stray", "id": 999})),
            Action::Send(json!({"return": "string id", "id": id.to_string()})),
            Action::Send(json!({"return": "float id", "id": 2.5})),
            Action::Send(json!({"return": "no id"})),
            Action::reply(json!("mine")),
        ]
    });
    let (_server, mut conn) = connect(script);
    assert_eq!(conn.execute("q", None).unwrap(), json!("mine"));
    assert_eq!(conn.unknown_replies(), 4);
    assert!(conn.is_connected());
    assert_eq!(conn.execute("q", None).unwrap(), json!("mine"));
}

/// #26: a late reply after a timeout is dropped, never given to the next command.
#[test]
fn late_reply_after_timeout_is_dropped() {
    let script = Script::new()
        .on(
            "slow",
            vec![
                Action::Sleep(Duration::from_millis(300)),
                Action::reply(json!("late")),
            ],
        )
        .on("next", vec![Action::reply(json!("next"))]);
    let (_server, mut conn) = connect(script);
    let (res, took) = timed(|| conn.execute_with_timeout("slow", None, Duration::from_millis(100)));
    assert!(
        matches!(res, Err(Error::CommandTimeout { ref command, .. }) if command == "slow"),
        "{res:?}"
    );
    assert_near(took, Duration::from_millis(100));
    assert_eq!(conn.execute("next", None).unwrap(), json!("next"));
    assert_eq!(conn.unknown_replies(), 1);
    assert_eq!(conn.session().in_flight(), 0);
}

/// #15: an id-less error with nothing id-less pending ends the session; pending and later
/// calls fail at once with Disconnected carrying it.
#[test]
fn idless_error_ends_session() {
    let script = Script::new().on("held", vec![]).on(
        "boom",
        vec![Action::Send(
            json!({"error": {"class": "GenericError", "desc": "JSON parse error"}}),
        )],
    );
    let (_server, mut conn) = connect(script);
    let held = conn.send(Command::new("held")).unwrap();
    match conn.execute("boom", None) {
        Err(Error::Disconnected { cause }) => {
            assert!(
                matches!(*cause, Error::ServerParse { ref desc, .. } if desc == "JSON parse error")
            )
        }
        other => panic!("expected Disconnected(ServerParse), got {other:?}"),
    }
    let (res, took) = timed(|| conn.wait_reply(held, Instant::now() + Duration::from_secs(5)));
    assert!(matches!(res, Err(Error::Disconnected { .. })), "{res:?}");
    assert!(took < Duration::from_millis(50));
    assert!(matches!(
        conn.execute("x", None),
        Err(Error::Disconnected { .. })
    ));
    assert!(!conn.is_connected());
}

/// #15: an id-less error goes to the pending id-less command.
#[test]
fn idless_error_goes_to_idless_command() {
    let script = Script::new().on(
        "parse-me",
        vec![Action::Send(
            json!({"error": {"class": "GenericError", "desc": "bad"}}),
        )],
    );
    let (server, mut conn) = connect(script);
    let id = conn
        .session_mut()
        .send_without_id(Command::new("parse-me"))
        .unwrap();
    match conn
        .wait_reply(id, Instant::now() + Duration::from_secs(5))
        .unwrap()
    {
        ServerMessage::Error(e) => assert_eq!(e.error.desc, "bad"),
        other => panic!("{other:?}"),
    }
    assert!(conn.is_connected());
    assert_eq!(server.commands()[1].id, None);
}

/// #16: a malformed reply fails only its own command.
#[test]
fn malformed_reply_fails_only_that_command() {
    let script = Script::new()
        .on_fn("no-return", |cmd| vec![Action::Send(json!({"id": cmd.id}))])
        .on_fn("bad-error", |cmd| {
            vec![Action::Send(json!({"error": {"desc": 1}, "id": cmd.id}))]
        })
        .on("good", vec![Action::reply(json!(1))]);
    let (_server, mut conn) = connect(script);
    for name in ["no-return", "bad-error"] {
        match conn.execute(name, None) {
            Err(Error::BadReply { command, raw }) => {
                assert_eq!(command, name);
                assert!(raw.contains("\"id\""), "{raw}");
            }
            other => panic!("{name}: expected BadReply, got {other:?}"),
        }
    }
    assert_eq!(conn.execute("good", None).unwrap(), json!(1));
}

/// quit: EOF without a reply is a clean close; quit returns Ok; later calls say Closed.
#[test]
fn quit_then_eof_is_clean() {
    let script = Script::new().on("quit", vec![Action::event("SHUTDOWN", None), Action::Close]);
    let (_server, mut conn) = connect(script);
    assert_eq!(conn.execute("quit", None).unwrap(), json!({}));
    assert!(!conn.is_connected());
    let err = conn.execute("query-status", None).unwrap_err();
    assert!(err.is_closed(), "{err:?}");
    assert_eq!(conn.drain_events()[0].event, "SHUTDOWN");
}

/// quit: ECONNRESET (QEMU exits with our bytes unread) is also a clean close.
#[test]
fn quit_then_connection_reset_is_clean() {
    let (client, server) = UnixStream::pair().unwrap();
    let peer = std::thread::spawn(move || {
        let mut server = server;
        server
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .unwrap();
        let mut buf = [0u8; 256];
        let n = server.read(&mut buf).unwrap();
        assert!(n > 0);
        server
            .write_all(b"{\"return\": {}, \"id\": 1}\r\n")
            .unwrap();
        // Read only part of `quit` and exit: the unread rest makes the kernel reset.
        let mut part = [0u8; 4];
        server.read_exact(&mut part).unwrap();
    });
    let mut conn = Connection::from_unix_stream(client, &config()).unwrap();
    let res = conn.execute("quit", None);
    peer.join().unwrap();
    assert_eq!(res.unwrap(), json!({}));
    assert!(conn.execute("x", None).unwrap_err().is_closed());
}

/// EOF without quit: pending calls fail at once with Disconnected(Eof).
#[test]
fn eof_fails_pending_commands() {
    let script = Script::new()
        .on("held", vec![])
        .on("die", vec![Action::Close]);
    let (_server, mut conn) = connect(script);
    let held = conn.send(Command::new("held")).unwrap();
    match conn.execute("die", None) {
        Err(Error::Disconnected { cause }) => {
            assert!(matches!(*cause, Error::Eof { .. }), "{cause:?}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        conn.wait_reply(held, Instant::now() + Duration::from_secs(5)),
        Err(Error::Disconnected { .. })
    ));
}

/// close() flushes and shuts down; the server sees EOF.
#[test]
fn close_is_clean() {
    let (server, conn) = connect(Script::new());
    conn.close().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(server.finished(), "server saw the close");
}

/// connect_with error propagation for an unreachable handshake is covered in handshake.rs;
/// here: a server that never answers a command gives CommandTimeout on time.
#[test]
fn command_timeout_is_accurate() {
    let (_server, conn) = connect_with(
        Script::new().on("stuck", vec![]),
        &config().with_command_timeout(Duration::from_millis(250)),
    );
    let mut conn = conn.unwrap();
    let (res, took) = timed(|| conn.execute("stuck", None));
    assert!(matches!(res, Err(Error::CommandTimeout { .. })), "{res:?}");
    assert_near(took, Duration::from_millis(250));
}

/// The late error reply of a timed-out id-less command is that command's, not a server
/// parse error: it is dropped and counted, and the session lives on.
#[test]
fn late_idless_error_after_timeout_does_not_end_the_session() {
    let script = Script::new()
        .on(
            "slow",
            vec![
                Action::Sleep(Duration::from_millis(300)),
                Action::Send(json!({"error": {"class": "GenericError", "desc": "late"}})),
            ],
        )
        .on("echo", vec![Action::reply(json!("alive"))]);
    let (_server, mut conn) = connect(script);
    let id = conn
        .session_mut()
        .send_without_id(Command::new("slow"))
        .unwrap();
    let res = conn.wait_reply(id, Instant::now() + Duration::from_millis(50));
    assert!(matches!(res, Err(Error::CommandTimeout { .. })), "{res:?}");
    // The server answers `echo` only after the late error: it has been read by then.
    assert_eq!(conn.execute("echo", None).unwrap(), json!("alive"));
    assert!(conn.is_connected());
    assert_eq!(conn.unknown_replies(), 1);
}

/// Id-less replies cannot be told apart: while a timed-out id-less command's reply is still
/// due, a new id-less command is refused rather than handed the old reply.
#[test]
fn late_idless_reply_never_reaches_the_next_idless_command() {
    let script = Script::new()
        .on(
            "slow",
            vec![
                Action::Sleep(Duration::from_millis(300)),
                Action::Send(json!({"return": "first"})),
            ],
        )
        .on("fast", vec![Action::Send(json!({"return": "second"}))])
        .on("echo", vec![Action::reply(json!({}))]);
    let (_server, mut conn) = connect(script);
    let slow = conn
        .session_mut()
        .send_without_id(Command::new("slow"))
        .unwrap();
    let res = conn.wait_reply(slow, Instant::now() + Duration::from_millis(50));
    assert!(matches!(res, Err(Error::CommandTimeout { .. })), "{res:?}");
    let sent = conn.session_mut().send_without_id(Command::new("fast"));
    match sent {
        Err(Error::IdlessBusy) => {}
        Ok(fast) => {
            let got = conn.wait_reply(fast, Instant::now() + Duration::from_secs(5));
            panic!("a second id-less command was sent and got {got:?}");
        }
        Err(e) => panic!("unexpected {e:?}"),
    }
    // Once the late reply has come (and been dropped), id-less commands work again.
    conn.execute("echo", None).unwrap();
    let fast = conn
        .session_mut()
        .send_without_id(Command::new("fast"))
        .unwrap();
    match conn
        .wait_reply(fast, Instant::now() + Duration::from_secs(5))
        .unwrap()
    {
        ServerMessage::Return(r) => assert_eq!(r.ret, json!("second")),
        other => panic!("{other:?}"),
    }
}

/// Out-of-band commands have a cap of their own ([`Config::max_oob_in_flight`]): past it, the
/// nonblocking `Session::send` refuses with `TooManyInFlight`, the blocking `send` waits for a
/// slot within its deadline, and a reply frees one. In-band slots are not affected.
#[test]
fn oob_commands_in_flight_are_capped() {
    const CAP: usize = 4;
    assert_eq!(Config::default().max_oob_in_flight, 64);
    let held: Arc<Mutex<Vec<Value>>> = Arc::default();
    let held2 = Arc::clone(&held);
    let script = Script::new()
        .on_fn("hold", move |cmd| {
            held2.lock().unwrap().push(cmd.id.clone().unwrap());
            vec![]
        })
        .on("inband", vec![Action::reply(json!({}))]);
    let config = config()
        .with_command_timeout(Duration::from_millis(200))
        .with_max_oob_in_flight(CAP);
    let (server, conn) = connect_with(script, &config);
    let mut conn = conn.unwrap();
    assert!(conn.oob_enabled());
    let oob = || Command::new("hold").with_oob(true);
    let ids: Vec<_> = (0..CAP).map(|_| conn.send(oob()).unwrap()).collect();
    assert_eq!(conn.session().oob_in_flight(), CAP);
    assert_eq!(conn.session().in_flight(), 0);
    // Nonblocking: refused at once, nothing queued.
    match conn.session_mut().send(oob()) {
        Err(Error::TooManyInFlight { limit }) => assert_eq!(limit, CAP),
        other => panic!("unexpected {other:?}"),
    }
    // Blocking: waits for a slot until the deadline, and was never written.
    let (res, took) = timed(|| conn.send(oob()));
    assert!(
        matches!(res, Err(Error::CommandTimeout { ref command, .. }) if command == "hold"),
        "{res:?}"
    );
    assert_near(took, Duration::from_millis(200));
    // In-band commands still have their own slots.
    assert_eq!(conn.execute("inband", None).unwrap(), json!({}));
    assert_eq!(
        server.wait_commands(2 + CAP, Duration::from_secs(5)).len(),
        2 + CAP
    );
    // A reply frees a slot.
    let first = held.lock().unwrap()[0].clone();
    server.inject(vec![Action::Send(json!({"return": {}, "id": first}))]);
    conn.wait_reply(ids[0], Instant::now() + Duration::from_secs(5))
        .unwrap();
    assert_eq!(conn.session().oob_in_flight(), CAP - 1);
    conn.send(oob()).unwrap();
    assert_eq!(conn.session().oob_in_flight(), CAP);
}
