//! Every way a connection ends, in error or not, gives back every fd it opened.
//!
//! A binary of its own with a single test, so no other test opens or closes fds while this
//! one counts the entries of /proc/self/fd.

// Helpers outside `#[test]` functions unwrap too (clippy.toml only exempts test bodies).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use qmp_client::testing::{Action, Script};
use qmp_client::{Config, Connection, Error, Listener, Shared};
use serde_json::json;

/// The fds open in this process, by number.
fn open_fds() -> BTreeSet<i32> {
    let dir = std::fs::read_dir("/proc/self/fd").unwrap();
    let mut fds: BTreeSet<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The directory handle read_dir used is closed by now; drop numbers that are gone.
    fds.retain(|fd| std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists());
    fds
}

fn short() -> Config {
    Config::default()
        .with_greeting_timeout(Duration::from_millis(200))
        .with_command_timeout(Duration::from_millis(200))
        .with_connect_timeout(Duration::from_millis(200))
}

/// Runs `scenario` and fails when it leaves an fd open that was not open before.
fn no_leak(name: &str, scenario: impl FnOnce()) {
    let before = open_fds();
    scenario();
    let after = open_fds();
    let leaked: Vec<_> = after.difference(&before).collect();
    assert!(leaked.is_empty(), "{name} leaked fds {leaked:?}");
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qfd")
        .tempdir_in("/tmp")
        .unwrap()
}

#[test]
fn no_path_leaks_an_fd() {
    let dir = tempdir();
    let path = |name: &str| -> PathBuf { dir.path().join(name) };

    no_leak("connect to a missing path", || {
        let res = Connection::connect_unix(&path("missing.sock"), &short());
        assert!(matches!(res, Err(Error::Connect { .. })), "{res:?}");
    });
    no_leak("path too long", || {
        let long = PathBuf::from("/tmp/".to_string() + &"x".repeat(200));
        assert!(matches!(
            Connection::connect_unix(&long, &short()),
            Err(Error::PathTooLong { .. })
        ));
        assert!(matches!(
            Listener::bind_unix(&long),
            Err(Error::PathTooLong { .. })
        ));
    });
    no_leak("greeting timeout", || {
        let listener = UnixListener::bind(path("silent.sock")).unwrap();
        let res = Connection::connect_unix(&path("silent.sock"), &short());
        assert!(matches!(res, Err(Error::GreetingTimeout { .. })), "{res:?}");
        drop(listener);
        std::fs::remove_file(path("silent.sock")).unwrap();
    });
    no_leak("eof before greeting", || {
        let (ours, peer) = UnixStream::pair().unwrap();
        drop(peer);
        let res = Connection::from_unix_stream(ours, &short());
        assert!(matches!(res, Err(Error::Eof { .. })), "{res:?}");
    });
    no_leak("aborted handshake", || {
        let (ours, _peer) = UnixStream::pair().unwrap();
        let (abort, abort_peer) = UnixStream::pair().unwrap();
        drop(abort_peer);
        let res = Connection::from_unix_stream_with_abort(ours, &short(), Some(abort.as_fd()));
        assert!(matches!(res, Err(Error::Aborted)), "{res:?}");
    });
    no_leak("negotiation refused", || {
        let script = Script::new().on(
            "qmp_capabilities",
            vec![Action::error("GenericError", "no")],
        );
        let (server, ours) = script.start_pair().unwrap();
        let res = Connection::from_unix_stream(ours, &short());
        assert!(matches!(res, Err(Error::Negotiation { .. })), "{res:?}");
        drop(server);
    });
    no_leak("listener: accept timeout, bind on an existing path", || {
        let listener = Listener::bind_unix(&path("l.sock")).unwrap();
        assert!(matches!(
            Listener::bind_unix(&path("l.sock")),
            Err(Error::Bind { .. })
        ));
        let res = listener.accept(Duration::from_millis(50), None, &short());
        assert!(matches!(res, Err(Error::AcceptTimeout { .. })), "{res:?}");
    });
    no_leak("listener: accept then greeting timeout", || {
        let listener = Listener::bind_unix(&path("g.sock")).unwrap();
        let peer = UnixStream::connect(path("g.sock")).unwrap();
        let res = listener.accept(Duration::from_secs(5), None, &short());
        assert!(matches!(res, Err(Error::GreetingTimeout { .. })), "{res:?}");
        drop(peer);
    });
    no_leak("tcp refused and tcp listener timeout", || {
        let listener = Listener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(Connection::connect_tcp(addr, &short()).is_err());
        let listener = Listener::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let res = listener.accept(Duration::from_millis(50), None, &short());
        assert!(matches!(res, Err(Error::AcceptTimeout { .. })), "{res:?}");
    });
    no_leak("session: commands, fds, timeout, eof, close", || {
        let script = Script::new()
            .on("getfd", vec![Action::reply(json!({}))])
            .on("echo", vec![Action::reply(json!(1))]);
        let (server, ours) = script.start_pair().unwrap();
        let mut conn = Connection::from_unix_stream(ours, &short()).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        conn.getfd("x", a.as_fd()).unwrap();
        assert_eq!(conn.execute("echo", None).unwrap(), json!(1));
        assert!(matches!(
            conn.execute("unscripted-and-unanswered", None),
            Err(Error::CommandTimeout { .. }) | Err(Error::Command { .. })
        ));
        conn.close().unwrap();
        drop((a, b, server.take_fds()));
        drop(server);
    });
    no_leak("shared: clones, close, fd passing", || {
        let script = Script::new().on("getfd", vec![Action::reply(json!({}))]);
        let (server, ours) = script.start_pair().unwrap();
        let shared = Shared::new(Connection::from_unix_stream(ours, &short()).unwrap()).unwrap();
        let mut other = shared.clone();
        let (a, _b) = UnixStream::pair().unwrap();
        other.getfd("y", a.as_fd()).unwrap();
        std::thread::spawn(move || drop(other)).join().unwrap();
        shared.close().unwrap();
        drop(shared);
        drop(server.take_fds());
        drop(server);
    });
    no_leak("peer vanishes mid-session", || {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let config = short().with_await_greeting(false).with_negotiate(false);
        let mut conn = Connection::from_unix_stream(ours, &config).unwrap();
        let id = conn.send(qmp_proto::Command::new("x")).unwrap();
        let mut buf = [0u8; 64];
        let n = peer.read(&mut buf).unwrap();
        assert!(n > 0);
        peer.write_all(b"{\"return\"").unwrap();
        drop(peer);
        let res = conn.wait_reply(id, std::time::Instant::now() + Duration::from_secs(5));
        assert!(matches!(res, Err(Error::Disconnected { .. })), "{res:?}");
    });
}
