//! Drain throughput with the log file on, beside a raw read loop on the same data in the same
//! run (the baseline: 64 KiB reads into a `BufWriter<File>`). Target: at least 0.9x the raw loop.
//!
//! Two console figures: the drain alone (the caller does not read, as in the back-pressure
//! case), and the drain while the caller sits in a `wait_for` whose pattern never comes (every
//! burst is also scanned, on a third thread).
//!
//! `cargo bench -p console-socket --bench drain [-- MIB]` (default 256 MiB per run, 9 runs of
//! each variant, interleaved; medians are reported).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use console_socket::{Config, Console, Error, Pattern};

const CHUNK: usize = 64 * 1024;
const RUNS: usize = 9;

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

/// The console: background drain into the log file and the 1 MiB buffer. With `waiting`, the
/// caller sits in a `wait_for` whose pattern never comes (so every burst is also scanned);
/// without, it only waits for the writer and closes (close joins the drain after the EOF).
fn console(
    total: usize,
    log: &Path,
    waiting: bool,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let (ours, peer) = UnixStream::pair()?;
    let mut console = Console::from_unix_stream(ours, Config::default().with_log_file(log))?;
    let start = Instant::now();
    let w = writer(peer, total);
    if waiting {
        match console.wait_for(&Pattern::substring("\x00never"), Duration::from_secs(600)) {
            Err(Error::Closed { .. }) => {}
            other => return Err(format!("expected the stream to end, got {other:?}").into()),
        }
    }
    w.join().map_err(|_| "writer panicked")?;
    console.close()?;
    let took = start.elapsed();
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
    let (mut raw, mut alone, mut waiting) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        raw.push(raw_loop(total, &log)?);
        alone.push(console(total, &log, false)?);
        waiting.push(console(total, &log, true)?);
    }
    let mbps = |d: Duration| total as f64 / 1e6 / d.as_secs_f64();
    let (raw, alone, waiting) = (median(raw), median(alone), median(waiting));
    println!(
        "drain {mib} MiB with the log file on: raw read loop {:.0} MB/s ({raw:?}); \
         console {:.0} MB/s ({alone:?}), ratio {:.2}x (target >= 0.90x); \
         console with a wait scanning {:.0} MB/s ({waiting:?}), ratio {:.2}x",
        mbps(raw),
        mbps(alone),
        mbps(alone) / mbps(raw),
        mbps(waiting),
        mbps(waiting) / mbps(raw),
    );
    Ok(())
}
