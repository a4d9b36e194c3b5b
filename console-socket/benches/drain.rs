//! Drain throughput with the log file on, beside a raw read loop on the same data in the same
//! run (the baseline: 64 KiB reads into a `BufWriter<File>`). Target: at least 0.9x the raw loop.
//!
//! Two console figures: the drain alone (the caller does not read, as in the back-pressure
//! case), and the drain while the caller sits in a `wait_for` whose pattern never comes (every
//! burst is also scanned, on a third thread).
//!
//! `cargo bench -p console-socket --bench drain [-- MIB]` (default 256 MiB per run, 9 runs of
//! each variant, interleaved). Reported: the best run's throughput (the machine is shared, so the
//! best run is the one least disturbed) and the median CPU time the whole process spent per GB
//! (writer included, same for all variants), which external load does not inflate.

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

/// User plus system CPU time of the whole process so far.
fn cpu_time() -> Result<Duration, Box<dyn std::error::Error>> {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec().max(0) as u64)
            + Duration::from_micros(t.tv_usec().max(0) as u64)
    };
    Ok(tv(usage.user_time()) + tv(usage.system_time()))
}

/// Runs `f` and returns its wall time and the process CPU time it used.
fn measure(
    f: impl FnOnce() -> Result<Duration, Box<dyn std::error::Error>>,
) -> Result<(Duration, Duration), Box<dyn std::error::Error>> {
    let before = cpu_time()?;
    let wall = f()?;
    Ok((wall, cpu_time()?.saturating_sub(before)))
}

/// Best wall time and median CPU time of a variant's runs.
fn summarize(mut runs: Vec<(Duration, Duration)>) -> (Duration, Duration) {
    let best = runs.iter().map(|r| r.0).min().unwrap_or_default();
    runs.sort_by_key(|r| r.1);
    (
        best,
        runs.get(runs.len() / 2).map(|r| r.1).unwrap_or_default(),
    )
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
        raw.push(measure(|| raw_loop(total, &log))?);
        alone.push(measure(|| console(total, &log, false))?);
        waiting.push(measure(|| console(total, &log, true))?);
    }
    let mbps = |d: Duration| total as f64 / 1e6 / d.as_secs_f64();
    let cpu_per_gb = |d: Duration| d.as_secs_f64() * 1e3 / (total as f64 / 1e9);
    let (raw, alone, waiting) = (summarize(raw), summarize(alone), summarize(waiting));
    println!(
        "drain {mib} MiB through a socketpair with the log file on (best of {RUNS}; CPU: median)"
    );
    println!(
        "  raw read loop:            {:6.0} MB/s, {:5.0} ms CPU/GB",
        mbps(raw.0),
        cpu_per_gb(raw.1)
    );
    println!(
        "  console (drain only):     {:6.0} MB/s, {:5.0} ms CPU/GB  -> {:.2}x raw throughput, \
         {:.2}x raw CPU (target >= 0.90x throughput)",
        mbps(alone.0),
        cpu_per_gb(alone.1),
        mbps(alone.0) / mbps(raw.0),
        alone.1.as_secs_f64() / raw.1.as_secs_f64(),
    );
    println!(
        "  console + scanning wait:  {:6.0} MB/s, {:5.0} ms CPU/GB  -> {:.2}x raw throughput, \
         {:.2}x raw CPU",
        mbps(waiting.0),
        cpu_per_gb(waiting.1),
        mbps(waiting.0) / mbps(raw.0),
        waiting.1.as_secs_f64() / raw.1.as_secs_f64(),
    );
    Ok(())
}
