//! An embedding process that closed its stdin, stdout and stderr: new sockets and pipes then
//! land on 0-2, yet QEMU must get its monitor, console and passed fds intact and its stdio on
//! our output pipe. Closing stdio is process-wide, so this runs as its own test binary (no
//! harness); failures are reported on a saved copy of stderr.

#[allow(dead_code)]
#[path = "../it/stub.rs"]
mod stub;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use stub::Stub;

/// Prints its stdio lines, writes to the fd given as `extra=N` if any, then serves QMP.
const BODY: &str = r#"echo to-stdout
echo to-stderr >&2
for a in "$@"; do case "$a" in extra=*) echo passed >&${a#extra=};; esac; done
greet
while true; do serve_one; done"#;

fn main() {
    // A copy of stderr above 2, for the panic message.
    let saved = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .expect("dup stderr");
    let report = std::fs::File::from(saved);
    std::panic::set_hook(Box::new(move |info| {
        let _ = writeln!(&report, "closed_stdio: {info}");
    }));
    for fd in 0..3 {
        // SAFETY: closing our own stdio; nothing in this process uses those fds afterwards
        // (the panic hook writes to its own duplicate).
        unsafe { libc::close(fd) };
    }

    // The monitor and console socketpairs land on 0-3 here.
    let stub = Stub::new(BODY);
    let mut b = stub.builder();
    b.console();
    let mut m = b.build();
    m.launch().expect("launch with stdio closed");
    m.cmd("query-status", ()).expect("query-status");
    let report = m.shutdown().expect("shutdown");
    assert_eq!(report.status, machine_core::ExitStatus::Code(0));
    let log = m.log().unwrap_or_default().to_string();
    assert!(log.contains("to-stdout"), "stdout captured: {log:?}");
    assert!(log.contains("to-stderr"), "stderr captured: {log:?}");
    drop(m);

    // A passed fd that landed on 1: QEMU sees it under the number pass_fd returns.
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let mut b = stub.builder();
    let n = b.pass_fd(w);
    assert!(n >= 3, "pass_fd returned {n}");
    b.arg(format!("extra={n}"));
    let mut m = b.build();
    m.launch().expect("launch with a passed fd");
    nix::fcntl::fcntl(
        &r,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .expect("nonblocking");
    let mut r = std::fs::File::from(r);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !got.ends_with(b"passed\n") {
        assert!(
            Instant::now() < deadline,
            "nothing on the passed fd: {got:?}"
        );
        let mut buf = [0u8; 64];
        match r.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("read: {e}"),
        }
    }
    m.shutdown().expect("shutdown");
}
