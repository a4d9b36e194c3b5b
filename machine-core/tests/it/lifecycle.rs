//! Running, ending and cleaning up: fds, temp dirs, Drop, the ladder, the exit report.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use machine_core::{EndedBy, Error, ExitStatus, Monitor, ShutdownLadder, Step, StepOutcome};

use crate::stub::{exclusive, own_fd_count, pid_exists, shared, Stub};

#[test]
fn quit_shutdown_reports_our_quit_and_cleans_up() {
    let _g = shared();
    let stub = Stub::serving();
    let mut m = stub.machine();
    m.launch().expect("launch");
    assert!(m.is_running());
    let temp = m.temp_dir().expect("temp dir").to_path_buf();
    assert!(temp.exists());
    let report = m.shutdown().expect("shutdown");
    assert_eq!(report.ended_by, EndedBy::Quit);
    assert_eq!(report.status, ExitStatus::Code(0));
    assert_eq!(report.steps.len(), 1);
    assert_eq!(report.steps[0].outcome, StepOutcome::Exited);
    assert_eq!(
        report.shutdown_event.as_ref().map(|e| e.reason.as_str()),
        Some("host-qmp-quit")
    );
    assert!(!temp.exists());
    assert_eq!(stub.leftovers(), 0);
    assert_eq!(m.exit_report().map(|r| r.status), Some(ExitStatus::Code(0)));
}

#[test]
fn the_child_sees_only_the_fds_we_list() {
    let _g = shared();
    // Greet, negotiate, then become `sleep`, which keeps exactly what it inherited.
    let stub = Stub::new("greet\nserve_one\nexec sleep 300");
    // An inheritable pipe in our process must not reach the child.
    let (leak_r, leak_w) = nix::unistd::pipe().expect("pipe");
    let (pass_a, pass_b) = std::os::unix::net::UnixStream::pair().expect("pair");
    let mut b = stub.builder();
    b.console();
    let passed = b.pass_fd(OwnedFd::from(pass_a));
    let mut m = b.build();
    let once_file = tempfile::tempfile().expect("file");
    let once = m.pass_fd_once(OwnedFd::from(once_file));
    m.launch().expect("launch");
    let pid = m.pid().expect("pid");
    let cl = m.command_line().expect("command line").to_string();
    let mon: i32 = cl
        .split("socket,id=mon,fd=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("monitor fd on the command line");
    let console: i32 = cl
        .split("socket,id=console,fd=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("console fd on the command line");
    // `exec sleep` happens right after the negotiation reply; wait for the exec to finish by
    // watching the process image change.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| !p.to_string_lossy().contains("sleep"))
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "stub never exec'd sleep");
        std::thread::yield_now();
    }
    let child_fds = || -> BTreeSet<i32> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("ls child fds")
            .map(|e| {
                e.expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .parse()
                    .expect("fd number")
            })
            .collect()
    };
    let expected: BTreeSet<i32> = [0, 1, 2, mon, console, passed, once].into_iter().collect();
    // The kernel switches /proc/PID/exe before it closes the close-on-exec fds of the old
    // image (bash's own), so right after the switch the table may still show them for a
    // moment. A real leak stays: give the exec 2 s to finish, then compare.
    let settle = Instant::now() + Duration::from_secs(2);
    let mut fds = child_fds();
    while fds != expected && Instant::now() < settle {
        std::thread::yield_now();
        fds = child_fds();
    }
    assert_eq!(fds, expected, "child fds");
    // The once-fd is closed in our process after the spawn; the kept one is not.
    assert!(nix::fcntl::fcntl(&pass_b, nix::fcntl::FcntlArg::F_GETFD).is_ok());
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/fd/0")).expect("stdin"),
        std::path::Path::new("/dev/null")
    );
    m.kill().expect("kill");
    drop((leak_r, leak_w));
}

#[test]
fn drop_without_shutdown_kills_reaps_and_removes_the_temp_dir() {
    let _g = shared();
    let stub = Stub::serving();
    let mut m = stub.machine();
    m.launch().expect("launch");
    let pid = m.pid().expect("pid");
    drop(m);
    assert!(
        !pid_exists(pid),
        "pid {pid} survived the drop (or is a zombie)"
    );
    assert_eq!(stub.leftovers(), 0);
}

/// Catalogue case 35: a caller that panics while its machine runs still leaves nothing
/// behind: unwinding drops the `Machine`, which kills and reaps QEMU and removes the temp dir.
#[test]
fn a_panic_while_qemu_runs_kills_reaps_and_removes_the_temp_dir() {
    let _g = shared();
    let stub = Stub::serving();
    let mut builder = stub.builder();
    let (tx, rx) = std::sync::mpsc::channel();
    let caller = std::thread::spawn(move || {
        let mut m = builder.build();
        m.launch().expect("launch");
        tx.send(m.pid().expect("pid")).expect("send pid");
        panic!("the caller fails while QEMU runs");
    });
    let pid = rx.recv().expect("pid");
    assert!(
        caller.join().is_err(),
        "the caller thread must have panicked"
    );
    assert!(
        !pid_exists(pid),
        "pid {pid} survived the panic (or is a zombie)"
    );
    assert_eq!(stub.leftovers(), 0, "temp dir left after the panic");
}

#[test]
fn launch_and_shutdown_leave_no_fd_behind() {
    let _g = exclusive();
    let stub = Stub::serving();
    let mut m = stub.builder().console().build();
    // Warm up once (lazy statics in the std, log, etc.).
    m.launch().expect("launch");
    m.shutdown().expect("shutdown");
    let before = own_fd_count();
    for _ in 0..5 {
        m.launch().expect("launch");
        m.cmd("query-status", ()).expect("query");
        m.shutdown().expect("shutdown");
    }
    // (The machine keeps its last console open for reading until the next launch, as it
    // did when `before` was counted.)
    assert_eq!(own_fd_count(), before, "fd delta after 5 cycles");
    // A failed launch must not leak either.
    let failing = Stub::new("exit 3");
    let mut f = failing.machine();
    for _ in 0..3 {
        assert!(f.launch().is_err());
    }
    drop(f);
    assert_eq!(own_fd_count(), before, "fd delta after 3 failed launches");
    drop(m);
}

#[test]
fn an_ignored_quit_escalates_to_sigkill_and_is_abnormal() {
    let _g = shared();
    let stub = Stub::new("IGNORE_QUIT=1\ngreet\nwhile true; do serve_one; done");
    let mut b = stub.builder();
    b.shutdown_ladder(ShutdownLadder::graceful(Duration::from_millis(300)));
    let mut m = b.build();
    m.launch().expect("launch");
    let started = Instant::now();
    let err = m.shutdown().expect_err("abnormal");
    assert!(started.elapsed() < Duration::from_secs(5));
    match err {
        Error::AbnormalShutdown { report, cause } => {
            assert_eq!(report.ended_by, EndedBy::Kill);
            assert_eq!(report.status.signal(), Some(libc::SIGKILL));
            assert_eq!(report.steps.len(), 2);
            assert_eq!(report.steps[0].outcome, StepOutcome::TimedOut);
            assert!(report.steps[0].elapsed >= Duration::from_millis(300));
            assert!(matches!(report.steps[1].step, Step::Kill { .. }));
            assert!(matches!(*cause, Error::ExitTimeout { .. }), "{cause:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!m.is_running());
    assert_eq!(stub.leftovers(), 0, "cleaned up anyway");
}

#[test]
fn wait_returns_when_qemu_exits_by_itself() {
    let _g = shared();
    let stub = Stub::new("greet\nserve_one\nserve_one\nexit 4");
    let mut m = stub.machine();
    m.launch().expect("launch");
    m.cmd("query-status", ()).expect("query");
    let report = m.wait(Duration::from_secs(10)).expect("wait");
    assert_eq!(report.status, ExitStatus::Code(4));
    assert_eq!(report.ended_by, EndedBy::Exited { code: 4 });
    // No step at all when the stub had already exited by the time wait() looked.
    assert!(
        report
            .steps
            .first()
            .is_none_or(|r| matches!(r.step, Step::Wait { .. })),
        "{:?}",
        report.steps
    );
}

#[test]
fn wait_past_its_timeout_kills_and_is_abnormal() {
    let _g = shared();
    let stub = Stub::serving();
    let mut m = stub.machine();
    m.launch().expect("launch");
    let started = Instant::now();
    let err = m.wait(Duration::from_millis(200)).expect_err("timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, Error::AbnormalShutdown { .. }), "{err:?}");
}

#[test]
fn no_qmp_mode_uses_sigterm() {
    let _g = shared();
    let stub = Stub::new("exec sleep 300");
    let mut b = stub.builder();
    b.monitor(Monitor::None);
    let mut m = b.build();
    m.launch().expect("launch");
    assert!(matches!(m.cmd("query-status", ()), Err(Error::NoMonitor)));
    let report = m.shutdown().expect("shutdown");
    assert_eq!(
        report.ended_by,
        EndedBy::OurSignal {
            signal: libc::SIGTERM
        }
    );
    assert_eq!(report.status.signal(), Some(libc::SIGTERM));
    assert!(
        matches!(report.steps[0].step, Step::Signal { signal, .. } if signal == machine_core::Signal::SIGTERM)
    );
}

#[test]
fn an_exit_nobody_collected_does_not_block_a_relaunch() {
    let _g = shared();
    // Exits by itself after answering one command past the negotiation.
    let stub = Stub::new("greet\nserve_one\nserve_one\nexit 0");
    let mut m = stub.machine();
    m.launch().expect("launch");
    m.cmd("query-status", ()).expect("query");
    // Wait for the stub to exit on its own, without calling shutdown/wait.
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.is_running() {
        assert!(Instant::now() < deadline);
        std::thread::yield_now();
    }
    m.launch().expect("relaunch after an uncollected exit");
    m.kill().expect("kill");
}

#[test]
fn invalid_utf8_output_never_breaks_cleanup() {
    let _g = shared();
    let stub =
        Stub::new("printf 'bad \\xff\\xfe bytes\\n' >&2\ngreet\nwhile true; do serve_one; done");
    let mut m = stub.machine();
    m.launch().expect("launch");
    let report = m.shutdown().expect("shutdown");
    let log = m.log().expect("log");
    assert!(log.contains("bad \u{fffd}\u{fffd} bytes"), "{log:?}");
    assert!(report.output_tail.iter().any(|l| l.contains("bytes")));
    assert_eq!(stub.leftovers(), 0);
}

#[test]
fn log_tail_is_available_while_running() {
    let _g = shared();
    let stub = Stub::new("echo early-output >&2\ngreet\nwhile true; do serve_one; done");
    let mut m = stub.machine();
    m.launch().expect("launch");
    // The greeting was sent after the echo, and the drain runs continuously.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !m.log_tail(1024).contains("early-output") {
        assert!(Instant::now() < deadline, "tail: {:?}", m.log_tail(1024));
        std::thread::yield_now();
    }
    assert_eq!(m.log(), None, "log() is for after the exit");
    m.shutdown().expect("shutdown");
    assert!(m.log().is_some_and(|l| l.contains("early-output")));
}

#[test]
fn qemu_dies_with_the_thread_that_launched_it() {
    let _g = shared();
    let stub = Stub::serving();
    let base = stub.base();
    let path = stub.path().to_path_buf();
    // Launched on a thread that then exits: PR_SET_PDEATHSIG delivers SIGKILL.
    let mut m = std::thread::spawn(move || {
        let mut b = machine_core::MachineBuilder::new(path);
        b.base_temp_dir(base);
        let mut m = b.build();
        m.launch().expect("launch");
        m
    })
    .join()
    .expect("thread");
    let report = m.wait(Duration::from_secs(10)).expect("wait");
    assert_eq!(
        report.ended_by,
        EndedBy::ExternalSignal {
            signal: libc::SIGKILL
        }
    );
}

#[test]
fn a_temp_dir_removed_underneath_does_not_break_shutdown() {
    let _g = shared();
    let stub = Stub::serving();
    let mut m = stub.machine();
    let dir = m.temp_dir().expect("temp dir").to_path_buf();
    m.launch().expect("launch");
    std::fs::remove_dir_all(&dir).expect("rm -rf");
    let report = m.shutdown().expect("shutdown despite the missing temp dir");
    assert_eq!(report.ended_by, EndedBy::Quit);
    assert_eq!(stub.leftovers(), 0);
}

#[test]
fn fd_exhaustion_fails_the_launch_without_leaking() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let _g = exclusive();
    let stub = Stub::serving();
    let mut m = stub.builder().console().build();
    let before = own_fd_count();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    // Room for a few fds only: the launch needs more (socketpairs, pipe, pidfd, epoll...).
    let tight = before as u64 + 3;
    setrlimit(Resource::RLIMIT_NOFILE, tight, hard).expect("setrlimit");
    let result = m.launch();
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore rlimit");
    let err = result.expect_err("launch with too few fds");
    let text = format!("{err:?}");
    assert!(
        text.contains("EMFILE") || text.contains("Too many open files") || text.contains("24"),
        "{text}"
    );
    assert!(!m.is_running());
    assert_eq!(own_fd_count(), before, "no fd leaked by the failed launch");
    assert_eq!(stub.leftovers(), 0);
    // With the limit back, the same machine launches.
    m.launch().expect("launch after restoring the limit");
    m.shutdown().expect("shutdown");
}

#[test]
fn a_crash_during_a_command_fails_it_fast_and_is_reported_as_a_crash() {
    let _g = shared();
    // Negotiate, then die on the next command without answering.
    let stub = Stub::new("greet\nserve_one\nIFS= read -r -d '}' -u $MON cmd\nkill -SEGV $$");
    let mut m = stub.machine();
    m.launch().expect("launch");
    let started = Instant::now();
    let err = m.cmd("query-status", ()).expect_err("crash mid-command");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, Error::Qmp { .. }), "{err:?}");
    let report = m.wait(Duration::from_secs(5)).expect("wait");
    assert_eq!(
        report.ended_by,
        EndedBy::Crash {
            signal: libc::SIGSEGV
        }
    );
    assert_eq!(
        m.exit_status().and_then(ExitStatus::signal),
        Some(libc::SIGSEGV)
    );
}

#[test]
fn a_wrapper_prefixes_the_command_line() {
    let _g = shared();
    let stub = Stub::serving();
    let mut b = stub.builder();
    b.wrapper(["env", "QEMU_STUB_WRAPPED=1"]).args(["-S"]);
    let mut m = b.build();
    m.launch().expect("launch through the wrapper");
    let argv: Vec<String> = m
        .command_line()
        .expect("command line")
        .argv()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(argv[0], "env");
    assert_eq!(argv[1], "QEMU_STUB_WRAPPED=1");
    assert_eq!(argv[2], stub.path().to_string_lossy());
    assert_eq!(argv.last().map(String::as_str), Some("-S"));
    m.shutdown().expect("shutdown");
}

#[test]
fn new_session_puts_qemu_in_its_own_session() {
    let _g = shared();
    let stub = Stub::serving();
    let ours = nix::unistd::getsid(None).expect("our session");
    for isolated in [false, true] {
        let mut b = stub.builder();
        b.new_session(isolated);
        let mut m = b.build();
        m.launch().expect("launch");
        let pid = m.pid().expect("pid") as i32;
        let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).expect("getsid");
        if isolated {
            assert_eq!(sid.as_raw(), pid, "session leader");
        } else {
            assert_eq!(sid, ours, "our session");
        }
        m.shutdown().expect("shutdown");
    }
}

#[test]
fn a_dead_monitor_makes_the_quit_step_a_sigterm_not_a_wasted_wait() {
    let _g = shared();
    // Negotiate, then close the monitor but keep running; SIGTERM ends it cleanly, as it
    // does QEMU. `quit` cannot be delivered: waiting the whole budget for it is pointless.
    let stub = Stub::new(
        "trap 'kill $nap 2>/dev/null; exit 0' TERM\ngreet\nserve_one\neval \"exec $MON>&-\"\nsleep 300 >/dev/null 2>&1 &\nnap=$!\nwait $nap\nexit 9",
    );
    let mut b = stub.builder();
    b.shutdown_ladder(ShutdownLadder::graceful(Duration::from_secs(3)));
    let mut m = b.build();
    m.launch().expect("launch");
    // Let the stub close its end and the client notice.
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.cmd("query-status", ()).is_ok() {
        assert!(Instant::now() < deadline, "the monitor never closed");
    }
    let started = Instant::now();
    let report = m.shutdown().expect("a graceful end through SIGTERM");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(report.status, ExitStatus::Code(0));
    assert_eq!(
        report.ended_by,
        EndedBy::OurSignal {
            signal: libc::SIGTERM
        }
    );
    assert!(
        matches!(report.steps[0].step, Step::Signal { signal, .. } if signal == machine_core::Signal::SIGTERM),
        "{:?}",
        report.steps
    );
    assert_eq!(stub.leftovers(), 0);
}

#[test]
fn a_shared_qmp_handle_works_from_another_thread_beside_the_machine() {
    let _g = shared();
    let stub = Stub::serving();
    let mut m = stub.machine();
    m.launch().expect("launch");
    let mut qmp = m.qmp_shared().expect("shared handle");
    assert!(matches!(m.qmp_connection(), Err(Error::QmpShared)));
    // Another thread waits for the SHUTDOWN event while this one keeps using the machine.
    let (queried_tx, queried) = std::sync::mpsc::channel();
    let waiter = {
        let mut qmp = qmp.clone();
        std::thread::spawn(move || {
            let status = qmp
                .execute("query-status", None)
                .expect("query from a thread");
            queried_tx.send(()).expect("tell the main thread");
            let event = qmp
                .wait_event(
                    &[machine_core::qmp_proto::EventFilter::new("SHUTDOWN")],
                    Duration::from_secs(10),
                )
                .expect("SHUTDOWN seen by the other thread");
            (status, event)
        })
    };
    assert_eq!(
        m.cmd("query-status", ()).expect("query")["status"],
        "running"
    );
    // A second call hands out the same connection.
    let mut again = m.qmp_shared().expect("again");
    assert!(again.is_connected());
    queried
        .recv_timeout(Duration::from_secs(10))
        .expect("the thread's query came back");
    m.cmd("quit", ()).expect("quit");
    let (status, event) = waiter.join().expect("thread");
    assert_eq!(status["status"], "running");
    assert_eq!(event.event, "SHUTDOWN");
    let report = m.wait(Duration::from_secs(10)).expect("wait");
    assert_eq!(report.ended_by, EndedBy::Quit);
    assert_eq!(report.status, ExitStatus::Code(0));
    assert!(
        qmp.execute("query-status", None).is_err(),
        "handle outlived the run"
    );
    assert_eq!(stub.leftovers(), 0);
    // A relaunch gets a fresh, owned connection again.
    m.launch().expect("relaunch");
    assert!(m.qmp_connection().is_ok());
    m.shutdown().expect("shutdown");
}

#[test]
fn the_shutdown_ladder_works_on_a_shared_connection() {
    let _g = shared();
    let stub = Stub::serving();
    let mut m = stub.machine();
    m.launch().expect("launch");
    let _qmp = m.qmp_shared().expect("shared handle");
    let report = m.shutdown().expect("shutdown");
    assert_eq!(report.ended_by, EndedBy::Quit);
    assert_eq!(
        report.shutdown_event.as_ref().map(|e| e.reason.as_str()),
        Some("host-qmp-quit")
    );
}

/// Like `get_pid()` in QEMU's Python `qemu.machine` is None once QEMU is not running: `pid()` says None as soon as
/// QEMU has exited, before anything reaps it, and the report keeps the pid.
#[test]
fn pid_is_none_once_qemu_exited_and_the_report_keeps_it() {
    let _g = shared();
    // It exits after answering one command past the negotiation.
    let stub = Stub::new("greet\nserve_one\nserve_one\nexit 5");
    let mut m = stub.machine();
    m.launch().expect("launch");
    let pid = m.pid().expect("pid while running");
    m.cmd("query-status", ()).expect("query-status");
    // Nothing reaps it here: wait for the exit itself (a zombie, then the pidfd is readable).
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.is_running() {
        assert!(Instant::now() < deadline, "stub never exited");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(pid_exists(pid), "not reaped yet: still a zombie");
    assert_eq!(m.pid(), None, "pid() after QEMU exited");
    let report = m.wait(Duration::from_secs(10)).expect("wait");
    assert_eq!(report.status, ExitStatus::Code(5));
    assert_eq!(report.pid, pid);
    assert_eq!(m.exit_report().map(|r| r.pid), Some(pid));
    assert_eq!(m.pid(), None);
}

/// Bytes queued in a unix socket that its peer has not read yet (`SIOCOUTQ`).
fn unread_bytes(sock: &std::os::unix::net::UnixStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer, which points to a live c_int; the
    // fd is borrowed from `sock` for the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    assert_eq!(ret, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    usize::try_from(queued).unwrap_or(0)
}

/// A burst of events bigger than one `process_io` budget, all already queued when the
/// machine starts waiting, and no more readiness edge after it: the exit wait must keep
/// reading while the connection wants to. Here the stub only exits once everything was read
/// (as a QEMU blocked on a full monitor socket would), so a wait that stops reading times out.
#[test]
fn the_exit_wait_keeps_reading_an_event_flood_past_the_read_budget() {
    use machine_core::qmp_client::testing::{Action, Script};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::net::UnixStream;
    let _g = shared();
    let stub = Stub::new(
        r#"for a in "$@"; do case "$a" in go=*) GO=${a#go=};; esac; done
read -r _ < "$GO"
exit 0"#,
    );
    let go = stub.base().join("go");
    nix::unistd::mkfifo(&go, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let monitor = stub.base().join("qmp.sock");
    let mut b = stub.builder();
    b.monitor(Monitor::Unix(monitor.clone()))
        .arg(format!("go={}", go.display()));
    let mut m = b.build();

    // 6 MiB of events after the negotiation reply, then one last event.
    let one = br#"{"event": "FLOOD", "data": {"filler": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#;
    let mut flood = Vec::with_capacity(6 << 20);
    while flood.len() < 6 << 20 {
        flood.extend_from_slice(one);
        flood.extend_from_slice(b"\r\n");
    }
    let budget = machine_core::qmp_client::PROCESS_BUDGET;
    assert!(flood.len() > 4 * budget);
    let script = Script::new().on(
        "qmp_capabilities",
        vec![
            Action::reply(serde_json::json!({})),
            Action::raw(flood),
            Action::event("FLOOD_END", None),
            Action::Close,
        ],
    );
    // Plays QEMU's client side: connects once the machine listens, with a send buffer that
    // holds the whole burst (one write, so no readiness edge after the machine's first
    // reads), then lets the stub exit once the machine has read every byte.
    let peer = std::thread::spawn(move || -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let sock = loop {
            match UnixStream::connect(&monitor) {
                Ok(sock) => break sock,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(err) => return Err(format!("connect: {err}")),
            }
        };
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SndBufForce, &(16 << 20))
            .map_err(|e| format!("SO_SNDBUFFORCE: {e}"))?;
        // Our copy keeps the socket open after the server closes its end: the machine sees
        // the burst, not an end of file.
        let watch = sock.try_clone().map_err(|e| format!("dup: {e}"))?;
        let server = script.start_on(sock).map_err(|e| format!("server: {e}"))?;
        while !server.finished() {
            if Instant::now() >= deadline {
                return Err("the fake server never finished writing".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        while unread_bytes(&watch) > 0 {
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} bytes never read by the waiting machine",
                    unread_bytes(&watch)
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // Nonblocking: with no reader left (the stub killed) this fails instead of hanging.
        let mut fifo = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&go)
            .map_err(|e| format!("open fifo: {e}"))?;
        fifo.write_all(b"go\n").map_err(|e| format!("fifo: {e}"))?;
        Ok(())
    });
    m.launch().expect("launch");
    let result = m.wait(Duration::from_secs(15));
    let peer = peer.join().expect("peer thread");
    let report = result.expect("wait");
    peer.expect("peer");
    assert_eq!(report.status, ExitStatus::Code(0));
    assert_eq!(
        report.last_events.last().map(|e| e.event.as_str()),
        Some("FLOOD_END")
    );
}

/// From QEMU 10 on, isa-debug-exit sends `SHUTDOWN {"guest": true, "reason": "guest-shutdown"}`
/// before QEMU exits with `(value << 1) | 1`. The exit status decides: this is a failing guest,
/// never a clean power-off.
#[test]
fn a_guest_shutdown_event_before_exit_11_is_the_guests_failure() {
    let _g = shared();
    let stub = Stub::new(
        r#"greet
serve_one
serve_one
printf '{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}, "timestamp": {"seconds": 1, "microseconds": 2}}\r\n' >&$MON
exit 11"#,
    );
    for (device, ended_by) in [
        (true, EndedBy::DebugExit { value: 5 }),
        (false, EndedBy::Exited { code: 11 }),
    ] {
        let mut b = stub.builder();
        if device {
            b.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        }
        let mut m = b.build();
        m.launch().expect("launch");
        // The stub answers this one command, then sends the event and exits.
        m.cmd("cont", ()).expect("cont");
        let report = m.wait(Duration::from_secs(10)).expect("wait");
        assert_eq!(report.status, ExitStatus::Code(11));
        assert_eq!(report.ended_by, ended_by);
        assert_eq!(
            report
                .shutdown_event
                .as_ref()
                .map(|e| (e.guest, e.reason.as_str())),
            Some((true, "guest-shutdown"))
        );
        assert!(!report.clean(), "{report}");
        assert!(
            report.summary().contains("exit code 11"),
            "{}",
            report.summary()
        );
    }
}

/// `qmp()` hands back QEMU's reply without the id we added to match it.
#[test]
fn qmp_replies_carry_no_id_of_ours() {
    let _g = shared();
    let stub = Stub::serving();
    let mut m = stub.machine();
    m.launch().expect("launch");
    let reply = m.qmp("query-status", ()).expect("query-status");
    assert_eq!(
        reply,
        serde_json::json!({"return": {"status": "running", "running": true}})
    );
    m.shutdown().expect("shutdown");
}

/// `tiny_guest` writes the kernel into the machine's temp dir at every launch, so the same
/// machine boots again after an exit removed the dir.
#[test]
fn the_tiny_guest_survives_a_relaunch() {
    let _g = shared();
    let stub = Stub::serving();
    let mut m = stub
        .builder()
        .tiny_guest(machine_core::guest::GuestMachine::Q35)
        .build();
    for round in 0..2 {
        m.launch().expect("launch");
        let argv = m.command_line().expect("command line").argv().to_vec();
        let at = argv
            .iter()
            .position(|a| a == "-kernel")
            .expect("a -kernel argument");
        let kernel = std::path::PathBuf::from(&argv[at + 1]);
        assert_eq!(
            kernel,
            m.temp_dir()
                .expect("temp dir")
                .join(machine_core::guest::KERNEL_FILE_NAME),
            "round {round}"
        );
        assert_eq!(
            std::fs::read(&kernel).expect("kernel file"),
            machine_core::guest::kernel_image(),
            "round {round}"
        );
        assert!(argv.iter().any(|a| a == "-nodefaults"));
        assert!(argv
            .iter()
            .any(|a| a == "isa-debug-exit,iobase=0xf4,iosize=0x04"));
        assert!(m.console().is_ok(), "the guest's console is on");
        m.shutdown().expect("shutdown");
        assert!(!kernel.exists(), "the temp dir went with the exit");
    }
}

#[test]
fn a_shared_monitor_serves_clients_beside_the_machine_and_names_the_client_that_quit() {
    use machine_core::qmp_client::{Config, Connection, MuxConfig, QuitPolicy, ShareAddress};
    let _g = shared();
    let stub = Stub::serving();
    let dir = tempfile::tempdir().expect("socket dir");
    let path = dir.path().join("vm.qmp");
    let mut m = stub
        .builder()
        .share_qmp(
            ShareAddress::unix(&path),
            MuxConfig::default().with_quit(QuitPolicy::Allow),
        )
        .build();
    m.launch().expect("launch");
    assert_eq!(m.sharing().expect("shared").path, path);
    let mut client = Connection::connect_unix(&path, &Config::default()).expect("attach");
    for _ in 0..20 {
        assert_eq!(
            client.execute("query-status", None).expect("client")["status"],
            "running"
        );
        assert_eq!(
            m.cmd("query-status", ()).expect("the machine's own")["status"],
            "running"
        );
    }
    // The machine's own connection stays usable beside the multiplexer.
    assert!(m.qmp_connection().is_ok());
    assert!(m.sharing_stats().expect("stats").commands_forwarded >= 20);
    client.execute("quit", None).expect("the client's quit");
    let report = m.wait(Duration::from_secs(10)).expect("wait");
    match &report.ended_by {
        EndedBy::SharedClient { client } => {
            assert!(client.starts_with("QMP client 1 (unix pid"), "{client}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!path.exists(), "the socket goes with the run");
    assert_eq!(stub.leftovers(), 0);
    // A path that is a regular file fails the launch and leaves nothing running.
    std::fs::write(&path, "user data").expect("file");
    let mut m = stub
        .builder()
        .share_qmp(ShareAddress::unix(&path), MuxConfig::default())
        .build();
    match m.launch() {
        Err(Error::Share { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(!m.is_running());
    assert_eq!(std::fs::read(&path).expect("file"), b"user data");
}
