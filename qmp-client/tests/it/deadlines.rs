//! Deadlines that must hold while the peer misbehaves without pause: an endless event flood
//! (the socket never runs dry) and a peer that stops reading (the socket never drains).

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qmp_client::{Config, Connection, Error, Shared};
use qmp_proto::EventFilter;

/// How long a call promised to finish in 300 ms may take before the test calls it hung.
const HUNG: Duration = Duration::from_secs(10);

/// A connection in command mode at once (no greeting, no negotiation) and the raw peer end.
fn raw_pair(command_timeout: Duration) -> (Connection, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let config = Config::default()
        .with_await_greeting(false)
        .with_negotiate(false)
        .with_command_timeout(command_timeout);
    (
        Connection::from_unix_stream(ours, &config).expect("adopt the socket"),
        theirs,
    )
}

/// A peer that writes events as fast as it can until `stop` is set or the socket closes, so
/// the client's socket is never empty. Its send buffer is made large and filled before this
/// returns, so every read the client makes finds a full chunk waiting.
fn flood(peer: UnixStream, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    nix::sys::socket::setsockopt(&peer, nix::sys::socket::sockopt::SndBuf, &(4 << 20))
        .expect("SO_SNDBUF");
    let (primed_tx, primed_rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let one = br#"{"event": "NOISE", "data": {"x": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}"#;
        let mut burst = Vec::new();
        while burst.len() < 256 * 1024 {
            burst.extend_from_slice(one);
            burst.extend_from_slice(b"\r\n");
        }
        let mut peer = peer;
        let mut written = 0;
        while !stop.load(Ordering::Relaxed) {
            if peer.write_all(&burst).is_err() {
                break;
            }
            written += burst.len();
            if written >= 2 << 20 {
                let _ = primed_tx.send(());
            }
        }
    });
    primed_rx.recv_timeout(HUNG).expect("flood primed");
    handle
}

/// Runs `f` on a thread and returns its result with the time it took, or panics when it has
/// not finished after [`HUNG`] (the thread is then left behind).
fn within_hung<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> (T, Duration) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let out = f();
        let _ = tx.send((out, start.elapsed()));
    });
    rx.recv_timeout(HUNG)
        .unwrap_or_else(|_| panic!("the call overran its 300 ms deadline by more than {HUNG:?}"))
}

/// Fills the socket's send buffer through `writer` (a duplicate of the client's socket) until
/// not one more byte fits.
fn fill(writer: &UnixStream) {
    writer.set_nonblocking(true).expect("nonblocking");
    let big = vec![b' '; 64 * 1024];
    while (&*writer).write(&big).is_ok() {}
    while (&*writer).write(b" ").is_ok() {}
}

#[test]
fn wait_event_keeps_its_deadline_under_an_endless_flood() {
    let (mut conn, peer) = raw_pair(Duration::from_secs(5));
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood(peer, Arc::clone(&stop));
    let (res, took) = within_hung(move || {
        let res = conn.wait_event(&[EventFilter::new("NEVER")], Duration::from_millis(300));
        (res, conn)
    });
    stop.store(true, Ordering::Relaxed);
    let (res, conn) = res;
    drop(conn);
    flooder.join().unwrap();
    assert!(matches!(res, Err(Error::EventTimeout { .. })), "{res:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn execute_keeps_its_deadline_under_an_endless_flood() {
    let (mut conn, peer) = raw_pair(Duration::from_millis(300));
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood(peer, Arc::clone(&stop));
    let (res, took) = within_hung(move || {
        let res = conn.execute("query-status", None);
        (res, conn)
    });
    stop.store(true, Ordering::Relaxed);
    let (res, conn) = res;
    drop(conn);
    flooder.join().unwrap();
    assert!(matches!(res, Err(Error::CommandTimeout { .. })), "{res:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn drain_events_returns_under_an_endless_flood() {
    let (mut conn, peer) = raw_pair(Duration::from_secs(5));
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood(peer, Arc::clone(&stop));
    let (res, took) = within_hung(move || {
        let events = conn.drain_events();
        (events.len(), conn)
    });
    stop.store(true, Ordering::Relaxed);
    let (drained, conn) = res;
    drop(conn);
    flooder.join().unwrap();
    assert!(drained > 0, "the flood was read");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn shared_wait_event_keeps_its_deadline_under_an_endless_flood() {
    let (conn, peer) = raw_pair(Duration::from_secs(5));
    let shared = Shared::new(conn).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood(peer, Arc::clone(&stop));
    let mut waiter = shared.clone();
    let (res, took) = within_hung(move || {
        waiter.wait_event(&[EventFilter::new("NEVER")], Duration::from_millis(300))
    });
    stop.store(true, Ordering::Relaxed);
    shared.close().unwrap();
    flooder.join().unwrap();
    assert!(matches!(res, Err(Error::EventTimeout { .. })), "{res:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn shared_getfd_keeps_its_deadline_when_the_peer_stops_reading() {
    let (ours, _peer) = UnixStream::pair().unwrap();
    let filler = ours.try_clone().unwrap();
    let config = Config::default()
        .with_await_greeting(false)
        .with_negotiate(false)
        .with_command_timeout(Duration::from_millis(300));
    let mut shared = Shared::new(Connection::from_unix_stream(ours, &config).unwrap()).unwrap();
    fill(&filler);
    let (_a, b) = UnixStream::pair().unwrap();
    let (res, took) = within_hung(move || shared.getfd("net0", b.as_fd()));
    assert!(matches!(res, Err(Error::CommandTimeout { .. })), "{res:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn getfd_keeps_its_deadline_when_the_peer_stops_reading() {
    let (ours, _peer) = UnixStream::pair().unwrap();
    let filler = ours.try_clone().unwrap();
    let (mut conn, _) = {
        let config = Config::default()
            .with_await_greeting(false)
            .with_negotiate(false)
            .with_command_timeout(Duration::from_millis(300));
        (Connection::from_unix_stream(ours, &config).unwrap(), ())
    };
    fill(&filler);
    let (_a, b) = UnixStream::pair().unwrap();
    let (res, took) = within_hung(move || conn.getfd("net0", b.as_fd()));
    assert!(matches!(res, Err(Error::CommandTimeout { .. })), "{res:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

/// A caller driving the socket from its own poll (many connections on one thread) gets control
/// back from `process_io` even while a peer floods without pause, and is told input is left.
#[test]
fn process_io_returns_under_an_endless_flood() {
    let (mut conn, peer) = raw_pair(Duration::from_secs(5));
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood(peer, Arc::clone(&stop));
    let (res, took) = within_hung(move || {
        let res = conn.process_io();
        let more = conn.wants_read();
        (res, more, conn)
    });
    stop.store(true, Ordering::Relaxed);
    let (res, more, conn) = res;
    drop(conn);
    flooder.join().expect("flooder");
    assert!(res.is_ok(), "{res:?}");
    assert!(more, "input is left: the caller must call again");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}
