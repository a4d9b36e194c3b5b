//! End of stream, deadlines, close and drop, sending, connecting and fd checks.

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use console_socket::{CloseReason, Config, Console, Error, LineEnding, Pattern};

use crate::{pair, LONG};

#[test]
fn eof_mid_wait_returns_closed_promptly_with_the_unconsumed_output() {
    for _ in 0..5 {
        let (mut console, mut peer) = pair(Config::default());
        let writer = std::thread::spawn(move || {
            peer.write_all(b"partial output, then QEMU dies").unwrap();
            // Let the wait start scanning before the end.
            std::thread::yield_now();
            let eof_at = Instant::now();
            drop(peer);
            eof_at
        });
        let result = console.wait_for(&Pattern::substring("login:"), LONG);
        let returned_at = Instant::now();
        let eof_at = writer.join().unwrap();
        match result {
            Err(Error::Closed { unconsumed, reason }) => {
                assert_eq!(unconsumed, b"partial output, then QEMU dies");
                assert_eq!(reason, CloseReason::Eof);
            }
            other => panic!("expected Closed, got {other:?}"),
        }
        let lag = returned_at.saturating_duration_since(eof_at);
        assert!(
            lag < Duration::from_millis(200),
            "Closed came {lag:?} after EOF"
        );
        assert!(console.is_closed());
        // Later waits fail the same way at once, with nothing left.
        let t = Instant::now();
        match console.read_line(LONG) {
            Err(Error::Closed { unconsumed, .. }) => assert!(unconsumed.is_empty()),
            other => panic!("expected Closed, got {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_millis(200));
    }
}

#[test]
fn a_match_before_eof_still_wins_over_closed() {
    let (mut console, mut peer) = pair(Config::default());
    peer.write_all(b"bye\n").unwrap();
    drop(peer);
    let m = console.wait_for(&Pattern::substring("bye"), LONG).unwrap();
    assert_eq!(m.matched(), b"bye");
    assert!(matches!(
        console.wait_for(&Pattern::substring("bye"), LONG),
        Err(Error::Closed { .. })
    ));
}

/// Runs a wait that must time out after `timeout` and returns how long it took.
fn timed_out_after(console: &mut Console, timeout: Duration) -> Duration {
    let start = Instant::now();
    let r = console.wait_for(&Pattern::regex("never+").unwrap(), timeout);
    let took = start.elapsed();
    assert!(
        matches!(r, Err(Error::Timeout { timeout: t, .. }) if t == timeout),
        "{r:?}"
    );
    took
}

#[test]
fn deadline_fires_on_time_with_and_without_traffic() {
    let (mut console, peer) = pair(Config::default());
    for ms in [0u64, 150, 400] {
        let want = Duration::from_millis(ms);
        let took = timed_out_after(&mut console, want);
        assert!(
            took >= want && took < want + Duration::from_millis(100),
            "timeout {want:?} took {took:?}"
        );
    }
    // A steady trickle of non-matching output must not extend (or cut short) the deadline.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        let mut peer = peer;
        std::thread::spawn(move || {
            let start = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && start.elapsed() < LONG {
                peer.write_all(b".").unwrap();
                std::thread::sleep(Duration::from_millis(5)); // the trickle's pace
            }
            peer
        })
    };
    let want = Duration::from_millis(500);
    let took = timed_out_after(&mut console, want);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _peer = trickle.join().unwrap();
    assert!(
        took >= want && took < want + Duration::from_millis(100),
        "timeout {want:?} under traffic took {took:?}"
    );
    assert!(console.bytes_total() > 10);
}

#[test]
fn close_is_idempotent_and_later_calls_say_closed_locally() {
    let (mut console, mut peer) = pair(Config::default());
    console.close().unwrap();
    console.close().unwrap();
    assert!(console.is_closed());
    match console.wait_for(&Pattern::substring("x"), LONG) {
        Err(Error::Closed { reason, .. }) => assert_eq!(reason, CloseReason::Local),
        other => panic!("expected Closed, got {other:?}"),
    }
    assert!(matches!(
        console.send(b"x"),
        Err(Error::Closed {
            reason: CloseReason::Local,
            ..
        })
    ));
    // The peer sees the end of the stream.
    peer.set_read_timeout(Some(LONG)).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(peer.read(&mut buf).unwrap(), 0);
}

#[test]
fn drop_closes_and_flushes_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let (console, mut peer) = pair(
        Config::default()
            .with_log_file(&log)
            .with_flush_interval(Duration::from_secs(3600)),
    );
    peer.write_all(b"kept").unwrap();
    drop(peer);
    // Wait for the drain to reach EOF, without consuming anything.
    let deadline = Instant::now() + LONG;
    while !console.is_closed() {
        assert!(Instant::now() < deadline, "EOF not seen");
        std::thread::yield_now();
    }
    drop(console);
    assert_eq!(std::fs::read(&log).unwrap(), b"kept");
}

#[test]
fn log_is_flushed_periodically_while_the_console_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let (console, mut peer) = pair(
        Config::default()
            .with_log_file(&log)
            .with_flush_interval(Duration::from_millis(50)),
    );
    let start = Instant::now();
    peer.write_all(b"small").unwrap();
    loop {
        if std::fs::read(&log).unwrap() == b"small" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(2), "log not flushed");
        std::thread::sleep(Duration::from_millis(5)); // polling the file, with a deadline
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(40),
        "flushed after {took:?}: per write?"
    );
    assert!(!console.is_closed());
}

#[test]
fn log_write_failure_is_reported_by_close() {
    let (mut console, mut peer) = pair(Config::default().with_log_file("/dev/full"));
    peer.write_all(b"this cannot be written").unwrap();
    drop(peer);
    let _ = console.wait_for(&Pattern::substring("never"), LONG);
    match console.close() {
        Err(Error::LogWrite { path, .. }) => assert_eq!(path, Path::new("/dev/full")),
        other => panic!("expected LogWrite, got {other:?}"),
    }
    // The first close reported it; the second has nothing more to say.
    console.close().unwrap();
}

#[test]
fn send_line_uses_the_configured_ending() {
    for (ending, want) in [
        (LineEnding::Cr, &b"info version\r"[..]),
        (LineEnding::Lf, b"info version\n"),
        (LineEnding::CrLf, b"info version\r\n"),
    ] {
        let (console, mut peer) = pair(Config::default().with_line_ending(ending));
        console.send_line("info version").unwrap();
        let mut got = vec![0; want.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, want);
    }
}

#[test]
fn exec_and_wait_sends_then_waits() {
    let (mut console, peer) = pair(Config::default());
    let responder = std::thread::spawn(move || {
        let mut peer = peer;
        let mut command = [0u8; 5];
        peer.read_exact(&mut command).unwrap();
        assert_eq!(&command, b"uname");
        peer.write_all(b"uname\r\nLinux\r\n# ").unwrap();
        peer
    });
    let m = console
        .exec_and_wait("uname", &Pattern::substring("# "), LONG)
        .unwrap();
    assert_eq!(m.text(), b"uname\r\nLinux\r\n# ");
    let _peer = responder.join().unwrap();
}

#[test]
fn sending_to_a_vanished_peer_is_a_broken_pipe_not_a_signal() {
    let (console, peer) = pair(Config::default());
    drop(peer);
    match console.send(b"hello") {
        Err(Error::BrokenPipe { written, len }) => assert_eq!((written, len), (0, 5)),
        other => panic!("expected BrokenPipe, got {other:?}"),
    }
}

#[test]
fn send_times_out_when_the_peer_never_reads() {
    let (console, _peer) = pair(Config::default().with_send_timeout(Duration::from_millis(200)));
    let big = vec![b'x'; 8 * 1024 * 1024];
    let start = Instant::now();
    match console.send(&big) {
        Err(Error::SendTimeout { written, len, .. }) => {
            assert!(written > 0 && written < len, "{written}/{len}");
        }
        other => panic!("expected SendTimeout, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_millis(400),
        "{took:?}"
    );
}

#[test]
fn connect_to_a_listening_path_and_talk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("con.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let accept = std::thread::spawn(move || {
        let (mut peer, _) = listener.accept().unwrap();
        peer.write_all(b"QEMU serial\r\n").unwrap();
        peer
    });
    let mut console = Console::connect(&path, Config::default()).unwrap();
    let _peer = accept.join().unwrap();
    assert_eq!(console.read_line(LONG).unwrap(), b"QEMU serial");
}

#[test]
fn connect_retries_until_the_listener_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let binder = {
        let path = path.clone();
        std::thread::spawn(move || {
            rx.recv().unwrap();
            let listener = UnixListener::bind(&path).unwrap();
            let (mut peer, _) = listener.accept().unwrap();
            peer.write_all(b"late\n").unwrap();
            peer
        })
    };
    tx.send(()).unwrap();
    let mut console = Console::connect(&path, Config::default()).unwrap();
    let _peer = binder.join().unwrap();
    assert_eq!(console.read_line(LONG).unwrap(), b"late");
}

#[test]
fn connect_gives_up_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nobody.sock");
    let timeout = Duration::from_millis(200);
    let start = Instant::now();
    match Console::connect(&path, Config::default().with_connect_timeout(timeout)) {
        Err(Error::ConnectTimeout {
            path: p, source, ..
        }) => {
            assert_eq!(p, path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected ConnectTimeout, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(100),
        "{took:?}"
    );
}

#[test]
fn too_long_socket_path_is_refused_before_connecting() {
    let path = Path::new("/tmp").join("s".repeat(120));
    match Console::connect(&path, Config::default()) {
        Err(Error::PathTooLong { len, max, .. }) => assert_eq!((len, max), (125, 107)),
        other => panic!("expected PathTooLong, got {other:?}"),
    }
}

#[test]
fn non_stream_fds_are_refused() {
    let (a, _b) = UnixDatagram::pair().unwrap();
    match Console::from_fd(a.into(), Config::default()) {
        Err(Error::NotAStreamSocket { source: None }) => {}
        other => panic!("expected NotAStreamSocket, got {other:?}"),
    }
    let (r, _w) = nix::unistd::pipe().unwrap();
    match Console::from_fd(r, Config::default()) {
        Err(Error::NotAStreamSocket { source: Some(e) }) => {
            assert_eq!(e.raw_os_error(), Some(nix::libc::ENOTSOCK))
        }
        other => panic!("expected NotAStreamSocket, got {other:?}"),
    }
}

#[test]
fn zero_capacity_is_an_invalid_config() {
    let (a, _b) = UnixStream::pair().unwrap();
    assert!(matches!(
        Console::from_unix_stream(a, Config::default().with_buffer_capacity(0)),
        Err(Error::InvalidConfig { .. })
    ));
}

/// `Console` is `Sync` and `send_line` promises one write: sends from several threads must
/// reach the peer whole, one after the other, even when the socket fills up mid-send.
#[test]
fn concurrent_sends_are_not_interleaved() {
    const LEN: usize = 1024 * 1024;
    let (console, mut peer) = pair(Config::default().with_send_timeout(LONG));
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 3 * LEN];
        peer.read_exact(&mut got).unwrap();
        got
    });
    std::thread::scope(|s| {
        for byte in [b'a', b'b', b'c'] {
            let console = &console;
            s.spawn(move || console.send(&vec![byte; LEN]).unwrap());
        }
    });
    let got = reader.join().unwrap();
    let runs: Vec<(u8, usize)> = got
        .chunk_by(|a, b| a == b)
        .map(|r| (r[0], r.len()))
        .collect();
    assert_eq!(runs.len(), 3, "sends interleaved: {} runs", runs.len());
    assert!(runs.iter().all(|&(_, n)| n == LEN), "{runs:?}");
}

/// A listener whose backlog is full (QEMU busy, not accepting) makes a blocking connect sleep
/// without limit: the connect timeout must still hold.
#[test]
fn connect_to_a_jammed_backlog_keeps_its_deadline() {
    use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jammed.sock");
    let listener = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let addr = UnixAddr::new(&path).unwrap();
    socket::bind(listener.as_raw_fd(), &addr).unwrap();
    socket::listen(&listener, Backlog::new(1).unwrap()).unwrap();
    // Fill the backlog with nonblocking connects nobody accepts.
    let mut queued = Vec::new();
    loop {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => queued.push(fd),
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(queued.len() < 1000, "the backlog never filled");
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let start = Instant::now();
        let config = Config::default().with_connect_timeout(Duration::from_millis(200));
        let res = Console::connect(&path, config).map(|_| ());
        let _ = tx.send((res, start.elapsed()));
    });
    let (res, took) = rx
        .recv_timeout(LONG)
        .expect("connect overran its 200 ms deadline by more than 10 s");
    assert!(matches!(res, Err(Error::ConnectTimeout { .. })), "{res:?}");
    assert!(took < Duration::from_millis(600), "{took:?}");
    drop((listener, queued));
}
