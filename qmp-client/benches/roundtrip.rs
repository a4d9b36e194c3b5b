//! Round-trip benchmark: `query-status` through `Connection` against a real QEMU, beside a raw
//! blocking unix-socket loop sending the identical bytes to the same QEMU in the same run.
//!
//! QEMU (`qemu-system-x86_64 -M none -nodefaults -display none`, or `$QEMU`) gets two QMP
//! monitors on two socketpairs: one for the client, one for the raw loop. Both negotiate the
//! same capabilities and send byte-identical commands (same ids), so the difference is the
//! client's own cost. The runs alternate in blocks to spread noise evenly. Client CPU time per
//! round trip comes from `getrusage(RUSAGE_THREAD)` (QEMU's time is not counted).
//!
//! Targets: client ≤ 1.1x the raw loop, ≤ 10 µs of client CPU per round trip. On a machine
//! where the system calls of one round trip alone cost more than that (nested virtualisation),
//! the line "beyond the raw loop" shows the client's own share.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::resource::{getrusage, UsageWho};
use qmp_client::{Config, Connection};

/// Round trips per side.
const N: usize = 2000;
/// Blocks the runs are split into (alternating client / raw).
const BLOCKS: usize = 20;
/// Unmeasured warm-up round trips per side.
const WARMUP: usize = 100;

/// Kills and reaps QEMU when dropped, whatever happens.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn inheritable(fd: &UnixStream) -> i32 {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).expect("clear FD_CLOEXEC");
    fd.as_raw_fd()
}

fn spawn_qemu() -> (Qemu, UnixStream, UnixStream) {
    let qemu = std::env::var_os("QEMU").unwrap_or_else(|| "qemu-system-x86_64".into());
    let (client, client_peer) = UnixStream::pair().expect("socketpair");
    let (raw, raw_peer) = UnixStream::pair().expect("socketpair");
    let a = inheritable(&client_peer);
    let b = inheritable(&raw_peer);
    let child = Command::new(qemu)
        .args([
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "tcg",
        ])
        .args(["-chardev", &format!("socket,id=mon0,fd={a}")])
        .args(["-mon", "chardev=mon0,mode=control"])
        .args(["-chardev", &format!("socket,id=mon1,fd={b}")])
        .args(["-mon", "chardev=mon1,mode=control"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    // QEMU has its copies now; ours would hide QEMU's exit from the reader.
    drop(OwnedFd::from(client_peer));
    drop(OwnedFd::from(raw_peer));
    (Qemu(child), client, raw)
}

/// The raw loop: blocking socket, one write per request, read up to the reply's CRLF.
struct Raw {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    line: String,
}

impl Raw {
    fn new(stream: UnixStream) -> Raw {
        let reader = BufReader::new(stream.try_clone().expect("dup"));
        let mut raw = Raw {
            writer: stream,
            reader,
            line: String::new(),
        };
        raw.read_line(); // greeting
        raw.roundtrip(br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":1}"#);
        raw
    }

    fn read_line(&mut self) {
        self.line.clear();
        let n = self.reader.read_line(&mut self.line).expect("read");
        assert!(n > 0, "QEMU closed the raw monitor");
    }

    fn roundtrip(&mut self, request: &[u8]) {
        self.writer.write_all(request).expect("write");
        self.read_line();
        assert!(self.line.contains("\"return\""), "raw reply: {}", self.line);
    }
}

/// CPU time of this thread so far: (user, system).
fn thread_cpu() -> Cpu {
    let usage = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage");
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    Cpu {
        user: tv(usage.user_time()),
        system: tv(usage.system_time()),
    }
}

#[derive(Clone, Copy, Default)]
struct Cpu {
    user: Duration,
    system: Duration,
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, rhs: Cpu) -> Cpu {
        Cpu {
            user: self.user - rhs.user,
            system: self.system - rhs.system,
        }
    }
}

impl std::ops::AddAssign for Cpu {
    fn add_assign(&mut self, rhs: Cpu) {
        self.user += rhs.user;
        self.system += rhs.system;
    }
}

fn main() {
    let (_qemu, client_stream, raw_stream) = spawn_qemu();
    let config = Config::default().with_greeting_timeout(Duration::from_secs(10));
    let mut conn = Connection::from_unix_stream(client_stream, &config).expect("handshake");
    let mut raw = Raw::new(raw_stream);
    assert!(conn.oob_enabled(), "QEMU 7.2 offers oob");

    // The client's ids start at 2 (1 was qmp_capabilities); the raw loop sends the same ids.
    let mut raw_id = 2u64;
    let mut request = Vec::with_capacity(64);
    let mut raw_rt = |raw: &mut Raw| {
        request.clear();
        write!(request, "{{\"execute\":\"query-status\",\"id\":{raw_id}}}").expect("format");
        raw_id += 1;
        raw.roundtrip(&request);
    };
    for _ in 0..WARMUP {
        conn.execute("query-status", None).expect("query-status");
        raw_rt(&mut raw);
    }

    let per_block = N / BLOCKS;
    let (mut client_wall, mut raw_wall) = (Duration::ZERO, Duration::ZERO);
    let (mut client_cpu, mut raw_cpu) = (Cpu::default(), Cpu::default());
    let mut block_ratios = Vec::with_capacity(BLOCKS);
    for _ in 0..BLOCKS {
        let (cpu0, t0) = (thread_cpu(), Instant::now());
        for _ in 0..per_block {
            let status = conn.execute("query-status", None).expect("query-status");
            assert!(status.get("status").is_some());
        }
        let client_block = t0.elapsed();
        client_wall += client_block;
        client_cpu += thread_cpu() - cpu0;

        let (cpu0, t0) = (thread_cpu(), Instant::now());
        for _ in 0..per_block {
            raw_rt(&mut raw);
        }
        let raw_block = t0.elapsed();
        raw_wall += raw_block;
        raw_cpu += thread_cpu() - cpu0;
        block_ratios.push(client_block.as_secs_f64() / raw_block.as_secs_f64());
    }
    block_ratios.sort_by(f64::total_cmp);
    let median_ratio = block_ratios[BLOCKS / 2];
    conn.execute("quit", None).expect("quit");

    let n = (per_block * BLOCKS) as f64;
    let us = |d: Duration| d.as_secs_f64() * 1e6 / n;
    let ratio = client_wall.as_secs_f64() / raw_wall.as_secs_f64();
    let cpu = |c: Cpu| {
        format!(
            "{:6.2} us CPU ({:.2} user + {:.2} system)",
            us(c.user + c.system),
            us(c.user),
            us(c.system)
        )
    };
    println!("qmp-client roundtrip: {n} query-status round trips per side, QEMU -M none (tcg)");
    println!(
        "  raw blocking loop : {:8.1} us/round trip, {}",
        us(raw_wall),
        cpu(raw_cpu)
    );
    println!(
        "  qmp_client        : {:8.1} us/round trip, {}",
        us(client_wall),
        cpu(client_cpu)
    );
    println!(
        "  ratio client/raw  : {ratio:.3}x overall, {median_ratio:.3}x median of {BLOCKS} alternating blocks (target <= 1.1x)"
    );
    println!(
        "  client CPU        : {:.2} us/round trip (target <= 10 us)",
        us(client_cpu.user + client_cpu.system)
    );
    // getrusage's user/system split is tick-sampled, but the total is scaled to the
    // scheduler's exact runtime; the raw loop's total is the kernel's share of a round trip.
    println!(
        "  client CPU beyond the raw loop's: {:.2} us/round trip",
        us(client_cpu.user + client_cpu.system) - us(raw_cpu.user + raw_cpu.system)
    );
}
