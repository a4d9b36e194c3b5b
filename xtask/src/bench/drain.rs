//! `console/drain`: console-socket's `Console` draining a socketpair into its buffer and log
//! file, beside a raw read loop on the same data (64 KiB reads into a `BufWriter<File>`), one of
//! each per round, order alternating. Target: at least 0.9x the raw loop's throughput.
//!
//! A writer thread sends the bytes in 64 KiB writes; every byte must arrive and be logged.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use console_socket::{Config, Console};

use super::{measure, Cpu, Figure, Settings, Target};

const CHUNK: usize = 64 * 1024;

/// Measures the drain, if `settings` selects it.
pub fn run(settings: &Settings) -> Result<Vec<Figure>, String> {
    let mut figure = Figure::new(
        "console/drain",
        "console drain with log file",
        "MB/s",
        "console_socket::Console",
        "raw read loop",
        Target::RatioAtLeast(0.9),
    );
    if !settings.wants(&figure.id, &figure.name) {
        return Ok(Vec::new());
    }
    let (mib, rounds) = settings.pick((256, 9), (16, 2));
    let total = mib << 20;
    let log = settings.scratch.join("drain.log");
    let mb = total as f64 / 1e6;
    for round in 0..rounds {
        for raw in [round % 2 == 0, round % 2 == 1] {
            let (result, _, cpu) = if raw {
                measure(Cpu::process, || raw_loop(total, &log))
            } else {
                measure(Cpu::process, || console(total, &log))
            };
            let wall = result?;
            let side = if raw {
                &mut figure.baseline
            } else {
                &mut figure.ours
            };
            side.push(mb / wall.as_secs_f64().max(1e-9), cpu, mib);
        }
    }
    figure.notes.push(format!(
        "{mib} MiB per run, {rounds} runs per side; CPU: the whole process (writer thread included, the same for both) per MiB"
    ));
    Ok(vec![figure])
}

/// Writes `total` bytes into `peer` in 64 KiB writes, then closes it.
fn writer(mut peer: UnixStream, total: usize) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let data: Vec<u8> = (0..CHUNK).map(|i| b' ' + (i % 90) as u8).collect();
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            peer.write_all(&data[..n])
                .map_err(|e| format!("writer: {e}"))?;
            left -= n;
        }
        Ok(())
    })
}

fn join(handle: JoinHandle<Result<(), String>>) -> Result<(), String> {
    handle
        .join()
        .map_err(|_| "the writer panicked".to_string())?
}

/// The baseline: a plain read loop into a buffered log file.
fn raw_loop(total: usize, log: &Path) -> Result<Duration, String> {
    let (mut ours, peer) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let file = File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let mut out = BufWriter::with_capacity(CHUNK, file);
    let started = Instant::now();
    let w = writer(peer, total);
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    loop {
        let n = ours.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(|e| format!("log: {e}"))?;
        got += n;
    }
    out.flush().map_err(|e| format!("log: {e}"))?;
    drop(out);
    let took = started.elapsed();
    join(w)?;
    check(got, total, log)?;
    Ok(took)
}

/// The console: background drain into the log file and the bounded buffer; the caller only
/// waits for the writer and closes (close joins the drain after the EOF).
fn console(total: usize, log: &Path) -> Result<Duration, String> {
    let (ours, peer) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let mut console = Console::from_unix_stream(ours, Config::default().with_log_file(log))
        .map_err(|e| format!("console: {e}"))?;
    let started = Instant::now();
    let w = writer(peer, total);
    join(w)?;
    console.close().map_err(|e| format!("close: {e}"))?;
    let took = started.elapsed();
    let got = usize::try_from(console.bytes_total()).map_err(|e| e.to_string())?;
    check(got, total, log)?;
    Ok(took)
}

/// Every byte read and logged, else Err; removes the log.
fn check(got: usize, total: usize, log: &Path) -> Result<(), String> {
    let on_disk = std::fs::metadata(log)
        .map_err(|e| format!("{}: {e}", log.display()))?
        .len();
    if got != total || on_disk != total as u64 {
        return Err(format!(
            "read {got} bytes, logged {on_disk}, expected {total}"
        ));
    }
    std::fs::remove_file(log).map_err(|e| format!("cannot remove {}: {e}", log.display()))
}
