//! The back-pressure test (the deadlock of QEMU's Python `qemu.machine`'s console): a peer floods 100 MB while the caller never reads. The peer
//! must never block for long, memory must stay bounded, and the log must get every byte.

use std::fs::File;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use console_socket::{Config, Error, Pattern};

use crate::pair;

const BLOCK: usize = 64 * 1024;
const BLOCKS: usize = 1600; // 1600 * 64 KiB = 104,857,600 bytes (100 MiB).
const CAPACITY: usize = 1024 * 1024;

/// Block `i` of the flood: printable filler with the block number stamped at its start, so a
/// lost, duplicated or reordered block cannot go unnoticed.
fn block(i: usize, filler: &[u8]) -> Vec<u8> {
    let mut b = filler.to_vec();
    let stamp = format!("[block {i:08}]");
    b[..stamp.len()].copy_from_slice(stamp.as_bytes());
    b
}

#[test]
fn hundred_megabytes_unread_never_block_the_peer_and_all_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("flood.log");
    let (mut console, mut peer) = pair(
        Config::default()
            .with_log_file(&log)
            .with_buffer_capacity(CAPACITY),
    );
    let filler: Vec<u8> = (0..BLOCK).map(|i| b'a' + (i % 26) as u8).collect();
    let writer_filler = filler.clone();
    let writer = std::thread::spawn(move || {
        let start = Instant::now();
        let mut longest = Duration::ZERO;
        for i in 0..BLOCKS {
            let data = block(i, &writer_filler);
            let t = Instant::now();
            peer.write_all(&data).unwrap();
            longest = longest.max(t.elapsed());
        }
        (start.elapsed(), longest)
        // `peer` drops here: EOF for the console.
    });

    // The caller "never reads", but checks the memory bound while the flood runs.
    let mut max_buffer = 0;
    while !writer.is_finished() {
        max_buffer = max_buffer.max(console.buffer_len());
        std::thread::yield_now();
    }
    let (total_time, longest_write) = writer.join().unwrap();
    eprintln!(
        "flood: 100 MiB written in {total_time:?}, longest 64 KiB write {longest_write:?}, \
         max buffer {max_buffer} bytes"
    );
    assert!(
        total_time < Duration::from_secs(60),
        "peer took {total_time:?}"
    );
    assert!(
        longest_write < Duration::from_secs(2),
        "peer blocked for {longest_write:?}"
    );
    assert!(max_buffer <= CAPACITY, "buffer grew to {max_buffer}");

    // After the flood: the stream ends, and the wait reports it with the last MiB.
    let total = (BLOCK * BLOCKS) as u64;
    match console.wait_for(
        &Pattern::substring("not in the flood"),
        Duration::from_secs(10),
    ) {
        Err(Error::Closed { unconsumed, .. }) => {
            assert_eq!(unconsumed.len(), CAPACITY);
            let last = block(BLOCKS - 1, &filler);
            assert!(unconsumed.ends_with(&last));
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    assert_eq!(console.bytes_total(), total);
    assert_eq!(console.bytes_dropped(), total - CAPACITY as u64);
    assert!(console.buffer_len() <= CAPACITY);
    console.close().unwrap();

    // The log holds every byte, in order.
    let mut file = File::open(&log).unwrap();
    assert_eq!(file.metadata().unwrap().len(), total);
    let mut got = vec![0; BLOCK];
    for i in 0..BLOCKS {
        file.read_exact(&mut got).unwrap();
        assert!(got == block(i, &filler), "log block {i} differs");
    }
    assert_eq!(file.read(&mut got).unwrap(), 0);
}

#[test]
fn output_queued_before_the_console_existed_is_drained_without_any_call() {
    let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
    // Output already waiting in the socket when the console is created...
    peer.write_all(&[b'a'; 100 * 1024]).unwrap();
    let console = console_socket::Console::from_unix_stream(ours, Config::default()).unwrap();
    // ...and far more than any socket buffer afterwards, with no call on the console at all:
    // every write completes only because the drain runs from creation.
    peer.set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let chunk = vec![b'b'; 64 * 1024];
    for _ in 0..64 {
        peer.write_all(&chunk).unwrap();
    }
    drop(peer);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !console.is_closed() {
        assert!(Instant::now() < deadline, "EOF not seen");
        std::thread::yield_now();
    }
    assert_eq!(console.bytes_total(), (100 + 64 * 64) * 1024);
}
