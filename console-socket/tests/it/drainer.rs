//! The poll-driven Drainer, driven by the test's own mio::Poll (as machine-core will drive
//! many consoles on one thread).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use console_socket::{Config, DrainStatus, Drainer, Error, Pattern, DRAIN_BUDGET};
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
    // Drain once after registering, then on events, and again at once while `More`.
    let mut ready = vec![true; drainers.len()];
    while drainers.iter().any(|d| !d.is_finished()) {
        assert!(Instant::now() < deadline, "drain did not finish");
        for (i, d) in drainers.iter_mut().enumerate() {
            if std::mem::take(&mut ready[i]) {
                match d.drain() {
                    DrainStatus::Closed => poll.registry().deregister(d).unwrap(),
                    DrainStatus::More => ready[i] = true,
                    DrainStatus::Open => {}
                }
            }
        }
        let timeout = if ready.contains(&true) {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        poll.poll(&mut events, Some(timeout)).unwrap();
        for event in &events {
            ready[event.token().0] = true;
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

/// Fairness on a shared poll: one peer floods endlessly (its socket buffer full before the
/// owner starts), another writes one short line. Each `drain` call reads at most
/// [`DRAIN_BUDGET`] bytes, so the short line is seen after a bounded number of bytes of the
/// flood, not after the flood's peer pauses (which it never does).
#[test]
fn a_flooding_console_does_not_starve_another_on_the_same_poll() {
    // Big enough that the flood's queued backlog is many budgets.
    const SNDBUF: usize = 4 * 1024 * 1024;
    let (ours_a, peer_a) = UnixStream::pair().unwrap();
    let (ours_b, mut peer_b) = UnixStream::pair().unwrap();
    nix::sys::socket::setsockopt(&peer_a, nix::sys::socket::sockopt::SndBuf, &SNDBUF).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (full_tx, full_rx) = mpsc::channel::<usize>();
    let flooder = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || flood(peer_a, &stop, &full_tx))
    };
    // Wait until the backlog is queued: the first drain of A has all of it available.
    let backlog = full_rx.recv_timeout(LONG).unwrap();
    assert!(backlog > 4 * DRAIN_BUDGET, "backlog {backlog}");
    peer_b.write_all(b"login: ").unwrap();

    let mut poll = Poll::new().unwrap();
    let (mut a, mut console_a) = Drainer::from_unix_stream(ours_a, Config::default()).unwrap();
    let (mut b, mut console_b) = Drainer::from_unix_stream(ours_b, Config::default()).unwrap();
    poll.registry()
        .register(&mut a, Token(0), Interest::READABLE)
        .unwrap();
    poll.registry()
        .register(&mut b, Token(1), Interest::READABLE)
        .unwrap();

    // The owner's loop, as documented: drain every source with an event or left at `More`;
    // poll without waiting while any source is left at `More`.
    let mut events = Events::with_capacity(8);
    let mut ready = [true, true];
    let deadline = Instant::now() + LONG;
    let mut a_bytes_when_seen = None;
    while Instant::now() < deadline {
        for (i, d) in [&mut a, &mut b].into_iter().enumerate() {
            if ready[i] {
                let status = d.drain();
                assert_ne!(status, DrainStatus::Closed);
                ready[i] = status == DrainStatus::More;
                assert_eq!(d.wants_read(), ready[i]);
            }
        }
        if a_bytes_when_seen.is_none()
            && console_b
                .wait_for(&Pattern::substring("login: "), Duration::ZERO)
                .is_ok()
        {
            a_bytes_when_seen = Some(console_a.bytes_total());
        }
        // A keeps being served too: it gets well past its initial backlog.
        if a_bytes_when_seen.is_some() && console_a.bytes_total() > 2 * backlog as u64 {
            break;
        }
        let timeout = if ready.contains(&true) {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        poll.poll(&mut events, Some(timeout)).unwrap();
        for event in &events {
            ready[event.token().0] = true;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let a_total = console_a.bytes_total();
    // Shuts the socket down: the flooder's blocked write fails and it returns.
    console_a.close().unwrap();
    drop(a);
    let written = flooder.join().unwrap();
    let seen_after = a_bytes_when_seen.expect("the short line was never seen");
    assert!(
        seen_after <= 2 * DRAIN_BUDGET as u64,
        "the short line was seen only after {seen_after} bytes of the flood \
         (budget {DRAIN_BUDGET}, backlog {backlog})"
    );
    assert!(a_total > 2 * backlog as u64);
    assert!(a_total <= written as u64);
}

/// Writes until the socket buffer is full, reports how much is queued, then keeps writing
/// (blocking) until told to stop or the reader goes away; returns the bytes written.
fn flood(mut peer: UnixStream, stop: &AtomicBool, full: &mpsc::Sender<usize>) -> usize {
    let chunk = vec![b'x'; 64 * 1024];
    let mut written = 0;
    peer.set_nonblocking(true).unwrap();
    loop {
        match peer.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("flood: {e}"),
        }
    }
    full.send(written).unwrap();
    peer.set_nonblocking(false).unwrap();
    while !stop.load(Ordering::Relaxed) {
        match peer.write(&chunk) {
            Ok(n) => written += n,
            Err(_) => break,
        }
    }
    written
}

/// The edge-triggered contract: when `drain` stops at its budget, no readiness event comes for
/// the input left (the peer has gone quiet), yet calling `drain` again reads it all.
#[test]
fn input_left_at_the_budget_is_read_by_calling_drain_again_without_an_event() {
    const TOTAL: usize = 3 * DRAIN_BUDGET + 100;
    let (ours, peer) = UnixStream::pair().unwrap();
    nix::sys::socket::setsockopt(&peer, nix::sys::socket::sockopt::SndBuf, &(2 * TOTAL)).unwrap();
    let writer = std::thread::spawn(move || {
        let mut peer = peer;
        peer.write_all(&vec![b'y'; TOTAL]).unwrap();
        peer
    });
    // All of it is queued once the writer returns (the buffer holds it).
    let _peer = writer.join().unwrap();
    let (mut drainer, console) = Drainer::from_unix_stream(ours, Config::default()).unwrap();
    let mut poll = Poll::new().unwrap();
    poll.registry()
        .register(&mut drainer, Token(0), Interest::READABLE)
        .unwrap();
    let mut events = Events::with_capacity(4);
    // The registration's one event.
    poll.poll(&mut events, Some(LONG)).unwrap();
    assert_eq!(events.iter().count(), 1);
    assert_eq!(drainer.drain(), DrainStatus::More);
    assert!(drainer.wants_read());
    let first = console.bytes_total();
    assert!(first > 0 && first <= DRAIN_BUDGET as u64, "first {first}");
    // Edge-triggered: nothing new arrived, so no event announces the rest.
    poll.poll(&mut events, Some(Duration::from_millis(50)))
        .unwrap();
    assert!(events.is_empty());
    let mut calls = 1;
    let mut before = first;
    loop {
        calls += 1;
        let status = drainer.drain();
        let now = console.bytes_total();
        assert!(
            now - before <= DRAIN_BUDGET as u64,
            "one call read {}",
            now - before
        );
        before = now;
        match status {
            DrainStatus::More => assert!(calls < 100),
            DrainStatus::Open => break,
            DrainStatus::Closed => panic!("closed"),
        }
    }
    assert!(!drainer.wants_read());
    assert_eq!(console.bytes_total(), TOTAL as u64);
    assert!(calls >= 4, "{calls} calls");
}

/// A thread-drained console hands its drainer to an owner's poll and takes it back, over and
/// over, while the peer keeps writing: every byte arrives once, in order, and waits work in
/// both modes (zero timeout on the polling thread, blocking on the thread's).
#[test]
fn the_drainer_moves_between_thread_and_poll_without_losing_a_byte() {
    let (mut console, peer) = crate::pair(Config::default().with_buffer_capacity(8 << 20));
    let stop = Arc::new(AtomicBool::new(false));
    let writing = Arc::clone(&stop);
    // How many bytes the test has taken: the writer stays at most 1 MiB ahead, so the
    // buffer never has to drop anything however the threads are scheduled.
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = Arc::clone(&taken);
    let writer = std::thread::spawn(move || {
        let mut peer = peer;
        let mut sent: u64 = 0;
        while !writing.load(Ordering::SeqCst) {
            if sent as usize * 9 > progress.load(Ordering::SeqCst) + (1 << 20) {
                std::thread::yield_now();
                continue;
            }
            let line = format!("{sent:08}\n");
            peer.write_all(line.as_bytes()).unwrap();
            sent += 1;
        }
        peer.write_all(b"END\n").unwrap();
        sent
    });
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(8);
    let mut seen = Vec::new();
    for _ in 0..20 {
        let mut drainer = console.take_drainer().unwrap();
        assert!(matches!(
            console.take_drainer(),
            Err(Error::DrainerHandover { .. })
        ));
        poll.registry()
            .register(&mut drainer, Token(1), Interest::READABLE)
            .unwrap();
        let deadline = Instant::now() + LONG;
        let before = seen.len();
        // On the polling thread: drain, then look without waiting.
        while seen.len() < before + 64 {
            assert!(Instant::now() < deadline, "the poll delivered nothing");
            if drainer.drain() == DrainStatus::Open {
                poll.poll(&mut events, Some(Duration::from_millis(50)))
                    .unwrap();
            }
            seen.extend(console.read_available());
            taken.store(seen.len(), Ordering::SeqCst);
        }
        poll.registry().deregister(&mut drainer).unwrap();
        console.drain_on_thread(drainer).unwrap();
        // Back on the thread: a blocking wait works.
        seen.extend(console.read_line(LONG).unwrap());
        seen.push(b'\n');
        taken.store(seen.len(), Ordering::SeqCst);
    }
    stop.store(true, Ordering::SeqCst);
    let sent = writer.join().unwrap();
    let rest = console
        .wait_for(&Pattern::substring("END\n"), LONG)
        .unwrap();
    seen.extend_from_slice(rest.text());
    let expected: Vec<u8> = (0..sent)
        .flat_map(|n| format!("{n:08}\n").into_bytes())
        .chain(b"END\n".iter().copied())
        .collect();
    assert_eq!(console.bytes_dropped(), 0);
    assert_eq!(seen.len(), expected.len());
    assert!(seen == expected, "bytes lost, duplicated or reordered");
}

/// Handover mistakes are typed errors, and a drainer given to another console is refused.
#[test]
fn handover_mistakes_are_typed_errors() {
    let (mut a, _peer_a) = crate::pair(Config::default());
    let (mut b, _peer_b) = crate::pair(Config::default());
    let drainer = a.take_drainer().unwrap();
    let err = b.drain_on_thread(drainer).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot move the console's drainer: the drainer belongs to another console"
    );
    // The refused drainer was dropped: a's waits end at once.
    assert!(matches!(a.read_line(LONG), Err(Error::Closed { .. })));
    let err = a.take_drainer().unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot move the console's drainer: no drain thread runs (the drainer is already driven by a poll)"
    );
    b.close().unwrap();
    assert!(matches!(
        b.take_drainer(),
        Err(Error::DrainerHandover {
            reason: "the console is closed"
        })
    ));
}
