//! Reading and matching: consecutive waits, output before a wait, prompts without newline,
//! patterns split across writes, failure patterns, lines, tail.

use std::io::Write;
use std::time::Duration;

use console_socket::{Config, Error, Outcome, Pattern};

use crate::{pair, LONG};

#[test]
fn consecutive_waits_see_consecutive_output() {
    let (mut console, mut peer) = pair(Config::default());
    peer.write_all(b"step 1 ok\nstep 2 ok\nstep 3 ok\n")
        .unwrap();
    let ok = Pattern::substring("ok");
    let offsets: Vec<u64> = (0..3)
        .map(|_| console.wait_for(&ok, LONG).unwrap().offset())
        .collect();
    assert_eq!(offsets, vec![7, 17, 27]);
    // Each wait consumed up to its match; only the final newline is left.
    assert_eq!(console.read_available(), b"\n");
}

#[test]
fn output_that_arrived_before_the_wait_is_not_missed() {
    let (mut console, mut peer) = pair(Config::default());
    peer.write_all(b"first\nsecond\n").unwrap();
    console
        .wait_for(&Pattern::substring("first"), LONG)
        .unwrap();
    // "second" was already in the buffer when this wait started.
    let m = console
        .wait_for(&Pattern::substring("second"), LONG)
        .unwrap();
    assert_eq!(m.text(), b"\nsecond");
    assert_eq!(m.before(), b"\n");
}

#[test]
fn prompt_matches_before_any_newline() {
    let (mut console, mut peer) = pair(Config::default());
    peer.write_all(b"Debian GNU/Linux 12\r\n\r\nvm login: ")
        .unwrap();
    let m = console
        .wait_for(&Pattern::substring("login: "), LONG)
        .unwrap();
    assert_eq!(m.matched(), b"login: ");
    assert_eq!(m.before(), b"Debian GNU/Linux 12\r\n\r\nvm ");
}

/// Writes `pattern` split at every pair of points, each piece in its own write, and checks the
/// wait finds it exactly once at the right offset.
fn split_everywhere(pattern: &Pattern, needle: &[u8]) {
    for a in 0..=needle.len() {
        for b in a..=needle.len() {
            let (mut console, mut peer) = pair(Config::default());
            let pieces: [Vec<u8>; 4] = [
                b"noise ".to_vec(),
                needle[..a].to_vec(),
                needle[a..b].to_vec(),
                needle[b..].to_vec(),
            ];
            let writer = std::thread::spawn(move || {
                for piece in pieces.iter().filter(|p| !p.is_empty()) {
                    peer.write_all(piece).unwrap();
                }
                peer.write_all(b" trailer").unwrap();
                peer
            });
            let m = console.wait_for(pattern, LONG).unwrap();
            assert_eq!(m.matched(), needle, "split at {a}/{b}");
            assert_eq!(m.offset(), 6, "split at {a}/{b}");
            let _peer = writer.join().unwrap();
        }
    }
}

#[test]
fn substring_split_across_writes_at_every_point() {
    split_everywhere(&Pattern::substring("login: "), b"login: ");
}

#[test]
fn regex_split_across_writes_at_every_point() {
    split_everywhere(
        &Pattern::regex(r"Linux version \d+\.\d+").unwrap(),
        b"Linux version 6.1",
    );
}

#[test]
fn wait_for_any_reports_a_failure_pattern() {
    let (mut console, mut peer) = pair(Config::default());
    peer.write_all(b"[    1.0] Kernel panic - not syncing: VFS\nlogin: ")
        .unwrap();
    let success = [Pattern::substring("login: "), Pattern::substring("# ")];
    let failure = [
        Pattern::substring("Oops"),
        Pattern::regex(r"Kernel panic - not syncing: \w+").unwrap(),
    ];
    let any = console.wait_for_any(&success, &failure, LONG).unwrap();
    assert_eq!(any.outcome, Outcome::Failure);
    assert_eq!(any.index, 1);
    assert!(!any.is_success());
    assert_eq!(any.found.matched(), b"Kernel panic - not syncing: VFS");
    // The success pattern is still there for the next wait.
    let next = console.wait_for_any(&success, &failure, LONG).unwrap();
    assert_eq!((next.outcome, next.index), (Outcome::Success, 0));
    assert_eq!(next.found.before(), b"\n");
}

#[test]
fn wait_for_any_prefers_the_match_that_ends_first_and_failure_on_ties() {
    let (mut console, mut peer) = pair(Config::default());
    peer.write_all(b"abcdef|xyz").unwrap();
    // "cd" ends before "abcde" although it starts later.
    let any = console
        .wait_for_any(
            &[Pattern::substring("abcde")],
            &[Pattern::substring("cd")],
            LONG,
        )
        .unwrap();
    assert_eq!(
        (any.outcome, any.found.matched()),
        (Outcome::Failure, &b"cd"[..])
    );
    // Same end: the failure pattern wins.
    let any = console
        .wait_for_any(
            &[Pattern::substring("f|xyz")],
            &[Pattern::substring("xyz")],
            LONG,
        )
        .unwrap();
    assert_eq!(any.outcome, Outcome::Failure);
}

#[test]
fn read_line_strips_terminators_and_partial_line_comes_back_on_close() {
    let (mut console, mut peer) = pair(Config::default());
    peer.write_all(b"abc\r\ndef\n\nghi").unwrap();
    assert_eq!(console.read_line(LONG).unwrap(), b"abc");
    assert_eq!(console.read_line(LONG).unwrap(), b"def");
    assert_eq!(console.read_line(LONG).unwrap(), b"");
    drop(peer);
    match console.read_line(LONG) {
        Err(Error::Closed { unconsumed, .. }) => assert_eq!(unconsumed, b"ghi"),
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[test]
fn tail_returns_recent_output_consumed_or_not() {
    let (mut console, mut peer) = pair(Config::default().with_buffer_capacity(8));
    peer.write_all(b"0123456789").unwrap();
    console.wait_for(&Pattern::substring("9"), LONG).unwrap();
    assert_eq!(console.tail(4), b"6789");
    // Only the last 8 bytes fit in memory.
    assert_eq!(console.tail(100), b"23456789");
    assert_eq!(console.buffer_len(), 8);
    assert_eq!(console.unconsumed_len(), 0);
}

#[test]
fn read_available_takes_everything_pending_without_waiting() {
    let (mut console, mut peer) = pair(Config::default());
    assert_eq!(console.read_available(), b"");
    peer.write_all(b"hello").unwrap();
    let m = console.wait_for(&Pattern::substring("he"), LONG).unwrap();
    assert_eq!(m.text(), b"he");
    assert_eq!(console.read_available(), b"llo");
    assert_eq!(console.read_available(), b"");
}

#[test]
fn timeout_consumes_nothing_and_shows_recent_output() {
    let (mut console, mut peer) = pair(Config::default());
    peer.write_all(b"some output").unwrap();
    console
        .wait_for(&Pattern::substring("output"), LONG)
        .unwrap();
    peer.write_all(b" more").unwrap();
    console.wait_for(&Pattern::substring("more"), LONG).unwrap();
    peer.write_all(b" tail").unwrap();
    console.wait_for(&Pattern::substring("tail"), LONG).unwrap();
    peer.write_all(b" pending").unwrap();
    let err = console
        .wait_for(&Pattern::substring("absent"), Duration::from_millis(50))
        .unwrap_err();
    match err {
        Error::Timeout {
            waiting_for,
            recent,
            ..
        } => {
            assert_eq!(waiting_for, "\"absent\"");
            // " pending" may still be in flight; whatever arrived is shown and kept.
            assert!(b" pending".starts_with(&recent), "{recent:?}");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    console
        .wait_for(&Pattern::substring("pending"), LONG)
        .unwrap();
}

#[test]
fn regex_anchor_is_relative_to_the_first_unconsumed_byte() {
    let (mut console, mut peer) = pair(Config::default());
    peer.write_all(b"ab\nab\n").unwrap();
    let line_start = Pattern::regex(r"(?m)^ab$").unwrap();
    assert_eq!(console.wait_for(&line_start, LONG).unwrap().offset(), 0);
    assert_eq!(console.wait_for(&line_start, LONG).unwrap().offset(), 3);
}

#[test]
fn exec_and_wait_any_reports_a_failure_pattern_as_such() {
    let (mut console, mut peer) = pair(Config::default());
    peer.write_all(b"$ ").unwrap();
    console.wait_for(&Pattern::substring("$ "), LONG).unwrap();
    let guest = std::thread::spawn(move || {
        let mut line = [0u8; 64];
        let n = std::io::Read::read(&mut peer, &mut line).unwrap();
        assert_eq!(&line[..n], b"echo c > /proc/sysrq-trigger\r");
        peer.write_all(b"echo c > /proc/sysrq-trigger\r\n[ 1.0] Kernel panic - not syncing: sysrq triggered crash\r\n")
            .unwrap();
        peer
    });
    let start = std::time::Instant::now();
    let seen = console
        .exec_and_wait_any(
            "echo c > /proc/sysrq-trigger",
            &[Pattern::substring("$ ")],
            &[Pattern::substring(console_socket::KERNEL_PANIC)],
            LONG,
        )
        .unwrap();
    assert_eq!(seen.outcome, Outcome::Failure);
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(seen.found.before().ends_with(b"[ 1.0] "));
    drop(guest.join().unwrap());
}

#[test]
fn interrupt_until_resends_until_the_pattern_and_times_out_with_the_total() {
    let (mut console, mut peer) = pair(Config::default());
    // The "guest" answers the third interrupt only.
    let guest = std::thread::spawn(move || {
        let mut seen = 0;
        let mut byte = [0u8; 1];
        while std::io::Read::read(&mut peer, &mut byte).unwrap_or(0) == 1 {
            seen += 1;
            if seen == 3 {
                peer.write_all(b"boot menu> ").unwrap();
            }
        }
        seen
    });
    let seen = console
        .interrupt_until(
            b"\x03",
            &[Pattern::substring("menu> ")],
            &[],
            Duration::from_millis(20),
            LONG,
        )
        .unwrap();
    assert!(seen.is_success());
    let err = console
        .interrupt_until(
            b"\x03",
            &[Pattern::substring("never")],
            &[],
            Duration::from_millis(20),
            Duration::from_millis(100),
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { timeout, .. } if *timeout == Duration::from_millis(100)),
        "{err:?}"
    );
    drop(console);
    assert!(guest.join().unwrap() >= 5);
}
