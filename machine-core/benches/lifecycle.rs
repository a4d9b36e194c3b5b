//! Benchmark: N cycles of launch -> `query-status` -> shutdown on `-M none -accel tcg`, with
//! `Machine` and, interleaved in the same run, with no library at all (socketpair, greeting,
//! negotiation, query, quit, reap by hand). Prints per-cycle times and our overhead.
//!
//! `cargo bench -p machine-core --bench lifecycle -- [--cycles N]` (default 40).

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use machine_core::MachineBuilder;

fn qemu() -> String {
    std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_owned())
}

const COMMON: [&str; 5] = ["-machine", "none", "-nodefaults", "-accel", "tcg"];

/// Reads one CRLF-terminated line (byte by byte is fine for a baseline: QEMU's lines are
/// short and we must not read past the line).
fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = stream.read(&mut byte)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
    }
}

/// Reads lines until one that is not an event.
fn read_reply(stream: &mut UnixStream) -> io::Result<String> {
    loop {
        let line = read_line(stream)?;
        if !line.starts_with("{\"event\"") {
            return Ok(line);
        }
    }
}

/// One cycle with no library. Returns (launch-to-negotiated, total).
fn raw_cycle() -> io::Result<(Duration, Duration)> {
    let start = Instant::now();
    let (mut ours, theirs) = UnixStream::pair()?;
    // The child's end must survive exec: clear close-on-exec on it.
    nix::fcntl::fcntl(
        &theirs,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(io::Error::from)?;
    let fd = theirs.as_raw_fd();
    let mut child = Command::new(qemu())
        .args(["-display", "none", "-vga", "none", "-chardev"])
        .arg(format!("socket,id=mon,fd={fd}"))
        .args(["-mon", "chardev=mon,mode=control"])
        .args(COMMON)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    drop(theirs);
    read_line(&mut ours)?;
    ours.write_all(br#"{"execute":"qmp_capabilities"}"#)?;
    read_reply(&mut ours)?;
    let negotiated = start.elapsed();
    ours.write_all(br#"{"execute":"query-status"}"#)?;
    let reply = read_reply(&mut ours)?;
    assert!(reply.contains("running"), "{reply}");
    ours.write_all(br#"{"execute":"quit"}"#)?;
    let mut rest = Vec::new();
    match ours.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(e),
    }
    let status = child.wait()?;
    assert!(status.success(), "{status}");
    Ok((negotiated, start.elapsed()))
}

/// One cycle with `Machine`. Returns (launch, total).
fn machine_cycle(base: &std::path::Path) -> machine_core::Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut m = MachineBuilder::new(qemu())
        .machine_type("none")
        .args(["-nodefaults", "-accel", "tcg"])
        .base_temp_dir(base)
        .build();
    m.launch()?;
    let launched = start.elapsed();
    let status = m.cmd("query-status", ())?;
    assert_eq!(status["status"], "running");
    let report = m.shutdown()?;
    assert!(report.status.success());
    Ok((launched, start.elapsed()))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// CPU time (user + system, all threads) this process has used so far.
fn cpu_now() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000)
            };
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => Duration::ZERO,
    }
}

/// Runs `f` and returns its result with the CPU time this process spent meanwhile.
fn with_cpu<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let before = cpu_now();
    let out = f();
    (out, ms(cpu_now().saturating_sub(before)))
}

/// The `q` quantile (0..=1) of `v` (nearest rank).
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((v.len() - 1) as f64 * q).round() as usize;
    v[rank.min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cycles: usize = args
        .iter()
        .position(|a| a == "--cycles")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let base = tempfile::tempdir().expect("base dir");
    // Warm-up: page cache, lazy statics.
    for _ in 0..3 {
        raw_cycle().expect("raw warm-up");
        machine_cycle(base.path()).expect("machine warm-up");
    }
    let (mut raw, mut lib, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    let (mut raw_up, mut lib_up) = (Vec::new(), Vec::new());
    let (mut raw_cpu, mut lib_cpu, mut cpu_diff) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..cycles {
        let run_raw = || with_cpu(|| raw_cycle().expect("raw cycle"));
        let run_lib = || with_cpu(|| machine_cycle(base.path()).expect("machine cycle"));
        // Alternate the order so drift hits both sides alike.
        let ((r, rc), (l, lc)) = if i % 2 == 0 {
            let r = run_raw();
            (r, run_lib())
        } else {
            let l = run_lib();
            (run_raw(), l)
        };
        raw_up.push(ms(r.0));
        lib_up.push(ms(l.0));
        raw.push(ms(r.1));
        lib.push(ms(l.1));
        diff.push(ms(l.1) - ms(r.1));
        raw_cpu.push(rc);
        lib_cpu.push(lc);
        cpu_diff.push(lc - rc);
        println!(
            "cycle {i:3}: raw {:7.3} ms (negotiated {:6.3}, our cpu {rc:.3}), machine {:7.3} ms (launched {:6.3}, our cpu {lc:.3})",
            ms(r.1),
            ms(r.0),
            ms(l.1),
            ms(l.0)
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (raw_mean, lib_mean) = (mean(&raw), mean(&lib));
    println!(
        "lifecycle ({cycles} cycles, -M none -accel tcg): raw median {:.3} ms (mean {raw_mean:.3}), \
         machine median {:.3} ms (mean {lib_mean:.3})",
        median(&mut raw),
        median(&mut lib),
    );
    println!(
        "  to negotiated: raw median {:.3} ms, machine launch() median {:.3} ms",
        median(&mut raw_up),
        median(&mut lib_up)
    );
    println!(
        "  overhead above raw (wall): median of paired differences {:.3} ms per cycle (target <= 0.3 ms)",
        median(&mut diff)
    );
    let (raw_p10, lib_p10) = (quantile(&mut raw, 0.1), quantile(&mut lib, 0.1));
    println!(
        "  10th percentile (least disturbed cycles): raw {raw_p10:.3} ms, machine {lib_p10:.3} ms, \
         difference {:.3} ms",
        lib_p10 - raw_p10
    );
    println!(
        "  our process's CPU per cycle: raw median {:.3} ms, machine median {:.3} ms, \
         paired difference median {:.3} ms",
        median(&mut raw_cpu),
        median(&mut lib_cpu),
        median(&mut cpu_diff)
    );
}
