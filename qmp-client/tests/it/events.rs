//! Events: queueing, ordering, total deadlines, execute_and_wait, the bounded queue and floods
//! (catalogue #7, #24, #25, and the event waits of QEMU's Python `qemu.machine`: a total deadline, no lost or
//! reordered events).

use std::time::{Duration, Instant};

use qmp_client::testing::{Action, Script};
use qmp_client::{Error, OverflowPolicy};
use qmp_proto::EventFilter;
use serde_json::json;

use crate::util::{args, assert_near, config, connect, connect_with, timed};

#[test]
fn events_between_command_and_reply_are_queued_in_order() {
    let script = Script::new().on(
        "stop",
        vec![
            Action::event("A", None),
            Action::event("STOP", None),
            Action::reply(json!({})),
        ],
    );
    let (_server, mut conn) = connect(script);
    conn.execute("stop", None).unwrap();
    assert_eq!(conn.pull_event(Duration::ZERO).unwrap().unwrap().event, "A");
    let rest: Vec<String> = conn.drain_events().into_iter().map(|e| e.event).collect();
    assert_eq!(rest, ["STOP"]);
    assert!(conn.pull_event(Duration::ZERO).unwrap().is_none());
}

#[test]
fn pull_event_waits_up_to_its_timeout() {
    let (server, mut conn) = connect(Script::new());
    let (res, took) = timed(|| conn.pull_event(Duration::from_millis(150)));
    assert!(res.unwrap().is_none());
    assert_near(took, Duration::from_millis(150));
    server.inject(vec![Action::event("LATER", Some(json!({"x": 1})))]);
    let event = conn.pull_event(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(event.event, "LATER");
    assert_eq!(event.data, Some(json!({"x": 1})));
}

/// The timeout is a total, non-matching events do not restart it and stay queued.
#[test]
fn wait_event_total_deadline_keeps_other_events() {
    let script = Script::new().on(
        "noise",
        (0..20)
            .flat_map(|i| {
                vec![
                    Action::event("NOISE", Some(json!({"i": i}))),
                    Action::Sleep(Duration::from_millis(30)),
                ]
            })
            .collect(),
    );
    let (server, mut conn) = connect(script);
    conn.send(qmp_proto::Command::new("noise")).unwrap();
    let (res, took) =
        timed(|| conn.wait_event(&[EventFilter::new("WANTED")], Duration::from_millis(250)));
    assert!(
        matches!(res, Err(Error::EventTimeout { ref names, .. }) if names == "WANTED"),
        "{res:?}"
    );
    assert_near(took, Duration::from_millis(250));
    drop(server);
    let queued: Vec<i64> = conn
        .drain_events()
        .iter()
        .map(|e| e.data.as_ref().unwrap()["i"].as_i64().unwrap())
        .collect();
    assert!(queued.len() >= 5, "{queued:?}");
    assert!(
        queued.windows(2).all(|w| w[0] + 1 == w[1]),
        "in order: {queued:?}"
    );
}

#[test]
fn wait_event_matches_name_and_pattern_among_alternatives() {
    let script = Script::new().after_greeting(vec![
        Action::event("JOB", Some(json!({"id": "a", "status": "running"}))),
        Action::event("JOB", Some(json!({"id": "b", "status": "done"}))),
        Action::event("OTHER", None),
    ]);
    let (_server, mut conn) = connect(script);
    let filters = [
        EventFilter::new("NEVER"),
        EventFilter::new("JOB").with_pattern(json!({"data": {"status": "done", "id": null}})),
    ];
    let event = conn.wait_event(&filters, Duration::from_secs(5)).unwrap();
    assert_eq!(event.data.unwrap()["id"], "b");
    let left: Vec<String> = conn.drain_events().into_iter().map(|e| e.event).collect();
    assert_eq!(left, ["JOB", "OTHER"]);
}

/// execute_and_wait: the event may come before the reply; older matching events are ignored.
#[test]
fn execute_and_wait_sees_event_before_reply_and_ignores_stale_ones() {
    let script = Script::new()
        .after_greeting(vec![Action::event(
            "DEVICE_DELETED",
            Some(json!({"device": "old"})),
        )])
        .on_fn("device_del", |cmd| {
            let id = cmd.arguments.as_ref().unwrap()["id"].clone();
            vec![
                Action::event("DEVICE_DELETED", Some(json!({"device": id}))),
                Action::reply(json!({})),
            ]
        });
    let (_server, mut conn) = connect(script);
    // Make sure the stale event has arrived before we start.
    let stale = conn
        .wait_event(
            &[EventFilter::new("DEVICE_DELETED")],
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(stale.data.unwrap()["device"], "old");
    let (ret, event) = conn
        .execute_and_wait(
            "device_del",
            Some(args(json!({"id": "kbd0"}))),
            &[
                EventFilter::new("DEVICE_DELETED")
                    .with_pattern(json!({"data": {"device": "kbd0"}})),
            ],
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(ret, json!({}));
    assert_eq!(event.data.unwrap()["device"], "kbd0");
}

#[test]
fn execute_and_wait_ignores_events_queued_before_the_send() {
    let script = Script::new()
        .after_greeting(vec![Action::event("STOP", None)])
        .on("stop", vec![Action::reply(json!({}))]);
    let (_server, mut conn) = connect(script);
    conn.wait_event(&[EventFilter::new("NONE")], Duration::from_millis(50))
        .unwrap_err();
    assert_eq!(conn.session().queued_events(), 1);
    let res = conn.execute_and_wait(
        "stop",
        None,
        &[EventFilter::new("STOP")],
        Duration::from_millis(200),
    );
    assert!(matches!(res, Err(Error::EventTimeout { .. })), "{res:?}");
    assert_eq!(
        conn.session().queued_events(),
        1,
        "the old STOP is still queued"
    );
}

/// #24/#25: a flood of 100k 1 KiB events before a reply: the reply arrives in time, memory is
/// bounded by the queue capacity, drops are counted, newest events kept.
#[test]
fn event_flood_never_delays_the_reply() {
    const N: usize = 100_000;
    let payload = "x".repeat(1000);
    let mut flood = Vec::with_capacity(N * 1100);
    for i in 0..N {
        let line = format!(
            "{{\"event\":\"FLOOD\",\"data\":{{\"i\":{i},\"pad\":\"{payload}\"}},\"timestamp\":{{\"seconds\":1,\"microseconds\":2}}}}\r\n"
        );
        flood.extend_from_slice(line.as_bytes());
    }
    let script = Script::new().on(
        "query-status",
        vec![
            Action::Raw(flood),
            Action::reply(json!({"status": "running"})),
        ],
    );
    let cfg = config()
        .with_event_queue(1000, OverflowPolicy::DropOldest)
        .with_command_timeout(Duration::from_secs(30));
    let (_server, conn) = connect_with(script, &cfg);
    let mut conn = conn.unwrap();
    let (res, took) = timed(|| conn.execute("query-status", None));
    assert_eq!(res.unwrap()["status"], "running");
    eprintln!("reply after a {N}-event flood in {took:?}");
    assert_eq!(conn.session().queued_events(), 1000);
    assert_eq!(conn.events_dropped(), (N - 1000) as u64);
    let first = conn.pull_event(Duration::ZERO).unwrap().unwrap();
    assert_eq!(
        first.data.unwrap()["i"],
        (N - 1000) as u64,
        "drop-oldest keeps the newest"
    );
    // Commands still work.
    assert_eq!(
        conn.execute("query-status", None).unwrap()["status"],
        "running"
    );
}

/// OverflowPolicy::Error: newcomers are discarded and the loss is reported once.
#[test]
fn overflow_error_policy_reports_loss_once() {
    let events: Vec<Action> = (0..10)
        .map(|i| Action::event("E", Some(json!({"i": i}))))
        .collect();
    let mut actions = events;
    actions.push(Action::reply(json!({})));
    let script = Script::new().on("go", actions);
    let cfg = config().with_event_queue(4, OverflowPolicy::Error);
    let (_server, conn) = connect_with(script, &cfg);
    let mut conn = conn.unwrap();
    conn.execute("go", None).unwrap();
    match conn.pull_event(Duration::ZERO) {
        Err(Error::EventsLost {
            dropped: 6,
            capacity: 4,
        }) => {}
        other => panic!("expected EventsLost, got {other:?}"),
    }
    let kept: Vec<u64> = std::iter::from_fn(|| conn.pull_event(Duration::ZERO).unwrap())
        .map(|e| e.data.unwrap()["i"].as_u64().unwrap())
        .collect();
    assert_eq!(kept, [0, 1, 2, 3], "the oldest are kept");
    assert_eq!(conn.events_dropped(), 6);
}

#[test]
fn clear_events_empties_the_queue() {
    let script =
        Script::new().after_greeting(vec![Action::event("A", None), Action::event("B", None)]);
    let (_server, mut conn) = connect(script);
    let deadline = Instant::now() + Duration::from_secs(5);
    while conn.session().queued_events() < 2 && Instant::now() < deadline {
        let _ = conn.wait_event(&[EventFilter::new("NONE")], Duration::from_millis(20));
    }
    conn.clear_events();
    assert!(conn.drain_events().is_empty());
}

/// An event already waiting in the socket (sent before our command, not read yet) is just as
/// old as one already queued: `execute_and_wait` must not take it for the command's event.
#[test]
fn execute_and_wait_ignores_events_unread_before_the_send() {
    use std::io::{Read, Write};
    let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let config = crate::util::config()
        .with_await_greeting(false)
        .with_negotiate(false);
    let mut conn = qmp_client::Connection::from_unix_stream(ours, &config).unwrap();
    // QEMU stopped on its own a moment ago; we have not read that yet.
    peer.write_all(
        b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\r\n",
    )
    .unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let n = peer.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("\"stop\""));
        // Already stopped: QEMU replies and emits no new STOP.
        peer.write_all(b"{\"return\": {}, \"id\": 1}\r\n").unwrap();
        peer
    });
    let res = conn.execute_and_wait(
        "stop",
        None,
        &[EventFilter::new("STOP")],
        Duration::from_millis(200),
    );
    let _peer = server.join().unwrap();
    assert!(matches!(res, Err(Error::EventTimeout { .. })), "{res:?}");
    assert_eq!(
        conn.session().queued_events(),
        1,
        "the old STOP stays queued"
    );
}

/// `Shared::drain_events` reads what has arrived, like `Connection::drain_events` (and
/// `get_qmp_events(wait=False)` in QEMU's Python `qemu.machine`): an event already in the socket is not left behind
/// just because no call happened to be reading.
#[test]
fn shared_drain_events_reads_what_has_arrived() {
    use std::io::Write;
    let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let config = crate::util::config()
        .with_await_greeting(false)
        .with_negotiate(false);
    let conn = qmp_client::Connection::from_unix_stream(ours, &config).unwrap();
    let mut shared = qmp_client::Shared::new(conn).unwrap();
    peer.write_all(
        b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\r\n",
    )
    .unwrap();
    let names: Vec<_> = shared.drain_events().into_iter().map(|e| e.event).collect();
    assert_eq!(names, ["STOP"]);
}

/// A zero timeout still reads what has arrived on a `Shared` (one nonblocking check), also
/// when an earlier read left the socket drained.
#[test]
fn shared_pull_event_with_zero_timeout_reads_what_has_arrived() {
    use std::io::{Read, Write};
    let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let config = crate::util::config()
        .with_await_greeting(false)
        .with_negotiate(false);
    let conn = qmp_client::Connection::from_unix_stream(ours, &config).unwrap();
    let mut shared = qmp_client::Shared::new(conn).unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let n = peer.read(&mut buf).unwrap();
        assert!(n > 0);
        peer.write_all(b"{\"return\": {}, \"id\": 1}\r\n").unwrap();
        peer
    });
    shared.execute("cont", None).unwrap();
    let mut peer = server.join().unwrap();
    assert!(shared.pull_event(Duration::ZERO).unwrap().is_none());
    peer.write_all(
        b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\r\n",
    )
    .unwrap();
    let event = shared.pull_event(Duration::ZERO).unwrap();
    assert_eq!(event.map(|e| e.event).as_deref(), Some("STOP"));
}
