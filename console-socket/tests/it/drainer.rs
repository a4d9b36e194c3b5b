//! The poll-driven Drainer, driven by the test's own mio::Poll (as machine-core will drive
//! many consoles on one thread).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use console_socket::{Config, DrainStatus, Drainer, Error, Pattern};
use mio::{Events, Interest, Poll, Token};

use crate::LONG;

#[test]
fn two_consoles_on_one_poll_are_drained_to_the_end() {
    const PER_PEER: usize = 8 * 1024 * 1024;
    let mut poll = Poll::new().unwrap();
    let mut drainers = Vec::new();
    let mut consoles = Vec::new();
    let mut writers = Vec::new();
    for i in 0..2u8 {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let (mut drainer, console) =
            Drainer::from_unix_stream(ours, Config::default().with_buffer_capacity(64 * 1024))
                .unwrap();
        poll.registry()
            .register(&mut drainer, Token(i.into()), Interest::READABLE)
            .unwrap();
        drainers.push(drainer);
        consoles.push(console);
        writers.push(std::thread::spawn(move || {
            let chunk = vec![b'0' + i; 4096];
            for _ in 0..PER_PEER / chunk.len() {
                peer.write_all(&chunk).unwrap();
            }
            peer.write_all(b"DONE").unwrap();
        }));
    }
    let mut events = Events::with_capacity(8);
    let deadline = Instant::now() + LONG;
    for d in &mut drainers {
        assert_eq!(d.drain(), DrainStatus::Open);
    }
    while drainers.iter().any(|d| !d.is_finished()) {
        assert!(Instant::now() < deadline, "drain did not finish");
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        for event in &events {
            let d = &mut drainers[event.token().0];
            if d.drain() == DrainStatus::Closed {
                poll.registry().deregister(d).unwrap();
            }
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    for (i, console) in consoles.iter_mut().enumerate() {
        assert_eq!(console.bytes_total(), (PER_PEER + 4) as u64);
        assert!(console.buffer_len() <= 64 * 1024);
        let m = console
            .wait_for(&Pattern::substring("DONE"), Duration::ZERO)
            .unwrap();
        assert_eq!(m.before().last(), Some(&(b'0' + i as u8)));
        assert!(matches!(
            console.wait_for(&Pattern::substring("x"), Duration::ZERO),
            Err(Error::Closed { .. })
        ));
    }
}

#[test]
fn owner_loop_flushes_the_log_when_next_flush_is_due() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("drainer.log");
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let flush = Duration::from_millis(50);
    let (mut drainer, mut console) = Drainer::from_unix_stream(
        ours,
        Config::default()
            .with_log_file(&log)
            .with_flush_interval(flush),
    )
    .unwrap();
    let mut poll = Poll::new().unwrap();
    poll.registry()
        .register(&mut drainer, Token(0), Interest::READABLE)
        .unwrap();
    let mut events = Events::with_capacity(4);
    assert_eq!(drainer.next_flush(), None);

    peer.write_all(b"boot: ok\nlogin: ").unwrap();
    let written = Instant::now();
    poll.poll(&mut events, Some(LONG)).unwrap();
    assert_eq!(drainer.drain(), DrainStatus::Open);
    // Buffered, not yet in the file: a flush is scheduled instead of a write per chunk.
    let due = drainer.next_flush().expect("a flush is due later");
    assert_eq!(std::fs::read(&log).unwrap(), b"");
    // The owner's loop: sleep in poll until the flush is due, then flush.
    while Instant::now() < due {
        poll.poll(&mut events, Some(due - Instant::now())).unwrap();
    }
    drainer.flush_if_due();
    assert!(written.elapsed() >= flush);
    assert_eq!(std::fs::read(&log).unwrap(), b"boot: ok\nlogin: ");
    assert_eq!(drainer.next_flush(), None);

    // On the polling thread, waits use a zero timeout.
    let m = console
        .wait_for(&Pattern::substring("login: "), Duration::ZERO)
        .unwrap();
    assert_eq!(m.before(), b"boot: ok\n");

    // Closing the console ends the drain: the drainer sees the shutdown.
    console.close().unwrap();
    poll.poll(&mut events, Some(LONG)).unwrap();
    assert_eq!(drainer.drain(), DrainStatus::Closed);
    assert!(drainer.is_finished());
}

#[test]
fn a_waiter_on_another_thread_is_woken_by_the_polling_thread() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let (mut drainer, mut console) = Drainer::from_unix_stream(ours, Config::default()).unwrap();
    let waiter = std::thread::spawn(move || {
        let r = console.wait_for(&Pattern::regex(r"ready \d+").unwrap(), LONG);
        (r, console)
    });
    let mut poll = Poll::new().unwrap();
    poll.registry()
        .register(&mut drainer, Token(0), Interest::READABLE)
        .unwrap();
    let mut events = Events::with_capacity(4);
    peer.write_all(b"ready 4").unwrap();
    peer.write_all(b"2 and more").unwrap();
    drop(peer);
    let deadline = Instant::now() + LONG;
    while drainer.drain() == DrainStatus::Open {
        assert!(Instant::now() < deadline);
        poll.poll(&mut events, Some(LONG)).unwrap();
    }
    let (r, mut console) = waiter.join().unwrap();
    let m = r.unwrap();
    // Depending on when the waiter ran, it saw "ready 4" or "ready 42": both are matches that
    // end in the output it had; what follows is still there.
    assert!(m.matched() == b"ready 4" || m.matched() == b"ready 42");
    let rest = console.read_available();
    assert!(rest.ends_with(b" and more"));
}

/// An owner that stops driving (drops the drainer without waiting for the end) must not leave
/// a waiter sitting out its timeout: nothing will ever deliver output again.
#[test]
fn dropping_the_drainer_ends_waits_at_once() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let (mut drainer, mut console) = Drainer::from_unix_stream(ours, Config::default()).unwrap();
    peer.write_all(b"partial output").unwrap();
    assert_eq!(drainer.drain(), DrainStatus::Open);
    let waiter = std::thread::spawn(move || {
        let start = Instant::now();
        let res = console.wait_for(&Pattern::substring("never printed"), LONG);
        (res, start.elapsed(), console)
    });
    // Whether the wait starts before or after the drop, it must end at once.
    drop(drainer);
    let (res, took, console) = waiter.join().unwrap();
    match res {
        Err(Error::Closed { unconsumed, .. }) => assert_eq!(unconsumed, b"partial output"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(console.is_closed());
}
