//! With SIGCHLD ignored by the embedding process the kernel reaps QEMU itself (no zombie, no
//! status): shutdown, wait and kill must still end cleanly. SIGCHLD's disposition is
//! process-wide, so this runs as its own test binary (no harness, no other tests).

#[allow(dead_code)]
#[path = "../it/stub.rs"]
mod stub;

use std::time::Duration;

use machine_core::{EndedBy, ExitStatus};

use stub::Stub;

fn main() {
    // SAFETY: setting SIGCHLD to SIG_IGN installs no handler; this process runs no other code
    // that depends on SIGCHLD.
    let previous = unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    assert_ne!(previous, libc::SIG_ERR, "signal(SIGCHLD, SIG_IGN)");

    // quit: QEMU exits by itself and is auto-reaped; the ladder's quit step still ends it.
    let stub = Stub::serving();
    let mut m = stub.machine();
    m.launch().expect("launch");
    let pid = m.pid().expect("pid");
    let report = m.shutdown().expect("shutdown with SIGCHLD ignored");
    assert_eq!(report.ended_by, EndedBy::Quit);
    assert_eq!(report.status, ExitStatus::UNKNOWN, "no status to collect");
    assert_eq!(report.pid, pid);
    assert!(!stub::pid_exists(pid), "no process left");
    assert_eq!(stub.leftovers(), 0);

    // wait: it exits by itself.
    let stub = Stub::new("greet\nserve_one\nexit 3");
    let mut m = stub.machine();
    m.launch().expect("launch");
    let report = m.wait(Duration::from_secs(10)).expect("wait");
    assert_eq!(report.status, ExitStatus::UNKNOWN);

    // kill: our SIGKILL ends it.
    let stub = Stub::new("greet\nserve_one\nexec sleep 300");
    let mut m = stub.machine();
    m.launch().expect("launch");
    let pid = m.pid().expect("pid");
    let report = m.kill().expect("kill");
    assert_eq!(report.ended_by, EndedBy::Kill);
    assert!(!stub::pid_exists(pid), "killed and gone");

    // Drop while running: no hang, nothing left.
    let stub = Stub::new("greet\nserve_one\nexec sleep 300");
    let mut m = stub.machine();
    m.launch().expect("launch");
    let pid = m.pid().expect("pid");
    drop(m);
    assert!(!stub::pid_exists(pid), "dropped and gone");

    // A failed exec is still an error, not a hang.
    let mut m = machine_core::MachineBuilder::new("/nonexistent/qemu").build();
    assert!(m.launch().is_err());
    println!("sigchld: ok");
}
