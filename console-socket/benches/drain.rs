//! Drain throughput with the log file on, beside a raw read loop on the same data in the same
//! run (the baseline: 64 KiB reads into a `BufWriter<File>`). Target: at least 0.9x the raw loop.
//!
//! `cargo bench -p console-socket --bench drain [-- MIB]` (default 256 MiB per run, 5 runs each,
//! alternating; the median is reported).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use console_socket::{Config, Console, Error, Pattern};

const CHUNK: usize = 64 * 1024;
const RUNS: usize = 5;

/// Writes `total` bytes into `peer` in 64 KiB writes, then closes it.
fn writer(mut peer: UnixStream, total: usize) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let data: Vec<u8> = (0..CHUNK).map(|i| b' ' + (i % 90) as u8).collect();
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            if let Err(e) = peer.write_all(&data[..n]) {
                eprintln!("bench writer failed: {e}");
                return;
            }
            left -= n;
        }
    })
}

/// The baseline: a plain read loop into a buffered log file.
fn raw_loop(total: usize, log: &Path) -> Result<Duration, Box<dyn std::error::Error>> {
    let (mut ours, peer) = UnixStream::pair()?;
    let mut out = BufWriter::with_capacity(CHUNK, File::create(log)?);
    let start = Instant::now();
    let w = writer(peer, total);
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    loop {
        let n = ours.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        got += n;
    }
    out.flush()?;
    drop(out);
    let took = start.elapsed();
    w.join().map_err(|_| "writer panicked")?;
    check(got, total, log)?;
    Ok(took)
}

/// The console: background drain into the log file and the 1 MiB buffer, nobody reading.
fn console(total: usize, log: &Path) -> Result<Duration, Box<dyn std::error::Error>> {
    let (ours, peer) = UnixStream::pair()?;
    let mut console = Console::from_unix_stream(ours, Config::default().with_log_file(log))?;
    let start = Instant::now();
    let w = writer(peer, total);
    match console.wait_for(&Pattern::substring("\x00never"), Duration::from_secs(600)) {
        Err(Error::Closed { .. }) => {}
        other => return Err(format!("expected the stream to end, got {other:?}").into()),
    }
    console.close()?;
    let took = start.elapsed();
    w.join().map_err(|_| "writer panicked")?;
    let got = usize::try_from(console.bytes_total())?;
    check(got, total, log)?;
    Ok(took)
}

fn check(got: usize, total: usize, log: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let on_disk = std::fs::metadata(log)?.len();
    if got != total || on_disk != total as u64 {
        return Err(format!("read {got} bytes, logged {on_disk}, expected {total}").into());
    }
    std::fs::remove_file(log)?;
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(256);
    let total = mib * 1024 * 1024;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("drain.log");
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        raw.push(raw_loop(total, &log)?);
        ours.push(console(total, &log)?);
    }
    let mbps = |d: Duration| total as f64 / 1e6 / d.as_secs_f64();
    let (raw, ours) = (median(raw), median(ours));
    println!(
        "drain {mib} MiB, log on: console {:.0} MB/s ({:?}), raw read loop {:.0} MB/s ({:?}), \
         ratio {:.2}x (target >= 0.90x)",
        mbps(ours),
        ours,
        mbps(raw),
        raw,
        mbps(ours) / mbps(raw),
    );
    Ok(())
}
