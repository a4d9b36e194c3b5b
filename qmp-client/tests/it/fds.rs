//! File descriptor passing with SCM_RIGHTS: getfd, add-fd, several fds, threads, TCP refusal.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use qmp_client::testing::{Action, Script};
use qmp_client::{Error, Listener, Shared};
use serde_json::json;

use crate::util::{config, connect};

/// Writes `marker` into `ours` and checks it comes out of `theirs` (the same pipe or socket).
fn same_channel(ours: &UnixStream, theirs: OwnedFd, marker: &str) {
    (&*ours).write_all(marker.as_bytes()).expect("write marker");
    let mut theirs = UnixStream::from(theirs);
    let mut buf = vec![0u8; marker.len()];
    theirs.read_exact(&mut buf).expect("read marker");
    assert_eq!(buf, marker.as_bytes());
}

#[test]
fn getfd_passes_the_fd_right_before_the_command() {
    let script = Script::new().on("getfd", vec![Action::reply(json!({}))]);
    let (server, mut conn) = connect(script);
    let (ours, theirs) = UnixStream::pair().unwrap();
    conn.getfd("net0", theirs.as_fd()).unwrap();
    let sent = server.commands();
    assert_eq!(sent[1].execute, "getfd");
    assert_eq!(sent[1].arguments.as_ref().unwrap()["fdname"], "net0");
    let mut fds = server.take_fds_with_position();
    assert_eq!(fds.len(), 1);
    let (position, fd) = fds.remove(0);
    assert_eq!(position, 1, "the fd arrives just before getfd");
    same_channel(&ours, fd, "hello");
    // Our copy stays open.
    (&theirs).write_all(b"x").unwrap();
}

#[test]
fn add_fd_arguments_and_reply() {
    let script = Script::new().on_fn("add-fd", |cmd| {
        let args = cmd.arguments.clone().unwrap();
        vec![Action::reply(
            json!({"fdset-id": args["fdset-id"], "fd": 42, "opaque": args["opaque"]}),
        )]
    });
    let (server, mut conn) = connect(script);
    let (_ours, theirs) = UnixStream::pair().unwrap();
    let ret = conn.add_fd(theirs.as_fd(), Some(3), Some("disk")).unwrap();
    assert_eq!(ret, json!({"fdset-id": 3, "fd": 42, "opaque": "disk"}));
    assert_eq!(server.take_fds().len(), 1);
}

#[test]
fn several_fds_in_one_message() {
    let (server, mut conn) = connect(Script::new().on("getfd", vec![Action::reply(json!({}))]));
    let pairs: Vec<(UnixStream, UnixStream)> =
        (0..3).map(|_| UnixStream::pair().unwrap()).collect();
    let borrowed: Vec<_> = pairs.iter().map(|(_, t)| t.as_fd()).collect();
    conn.send_fds(&borrowed).unwrap();
    conn.execute("getfd", None).unwrap();
    let fds = server.take_fds();
    assert_eq!(fds.len(), 3);
    for (i, ((ours, _), fd)) in pairs.iter().zip(fds).enumerate() {
        same_channel(ours, fd, &format!("fd{i}"));
    }
    // The carrier byte is a space, which QMP's parser skips.
    let received = server.received();
    assert_eq!(received.iter().filter(|b| **b == b' ').count(), 1);
}

/// Threads passing fds at once: each getfd claims its own thread's fd.
#[test]
fn shared_getfd_is_atomic_across_threads() {
    let (server, conn) = connect(Script::new().on("getfd", vec![Action::reply(json!({}))]));
    let shared = Shared::new(conn).unwrap();
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let mut shared = shared.clone();
            std::thread::spawn(move || {
                let mut ours = Vec::new();
                for i in 0..10 {
                    let (a, b) = UnixStream::pair().unwrap();
                    shared.getfd(&format!("t{t}i{i}"), b.as_fd()).unwrap();
                    ours.push((format!("t{t}i{i}"), a));
                }
                ours
            })
        })
        .collect();
    let mut ours = std::collections::HashMap::new();
    for w in workers {
        ours.extend(w.join().unwrap());
    }
    let commands = server.wait_commands(81, Duration::from_secs(5));
    let fds = server.take_fds_with_position();
    assert_eq!(fds.len(), 80);
    let positions: std::collections::HashSet<usize> = fds.iter().map(|(p, _)| *p).collect();
    assert_eq!(positions.len(), 80, "each fd is followed by its own getfd");
    for (position, fd) in fds {
        let name = commands[position].arguments.as_ref().unwrap()["fdname"]
            .as_str()
            .unwrap()
            .to_owned();
        same_channel(&ours[&name], fd, &name);
    }
}

#[test]
fn fd_passing_over_tcp_is_refused() {
    let listener = Listener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    // The peer plays QEMU in client mode over TCP.
    let peer = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf).unwrap();
        s.write_all(b"{\"return\": {}, \"id\": 1}\r\n").unwrap();
        // Wait for the client to close.
        while s.read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    let mut conn = listener
        .accept(Duration::from_secs(5), None, &config())
        .unwrap();
    let (_ours, theirs) = UnixStream::pair().unwrap();
    assert!(matches!(
        conn.getfd("x", theirs.as_fd()),
        Err(Error::FdPassingUnsupported)
    ));
    assert!(conn.is_connected());
    conn.close().unwrap();
    peer.join().unwrap();
}
