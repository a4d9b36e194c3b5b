//! Launch failures: each is a typed error, fast, with everything rolled back.

use std::time::{Duration, Instant};

use machine_core::{Error, ExitStatus, MachineBuilder};

use crate::stub::{shared, Stub};

#[test]
fn missing_binary_is_reported_before_anything_is_created() {
    let _g = shared();
    let stub = Stub::serving();
    let mut b = MachineBuilder::new(stub.path().with_file_name("does-not-exist"));
    b.base_temp_dir(stub.base());
    let err = b.build().launch().expect_err("missing binary");
    assert!(matches!(err, Error::BinaryNotFound { .. }), "{err:?}");
    assert_eq!(stub.leftovers(), 0);
}

#[test]
fn a_wrapper_that_is_missing_is_reported_too() {
    let _g = shared();
    let stub = Stub::serving();
    let mut b = stub.builder();
    b.wrapper(["/nonexistent/valgrind"]);
    let err = b.build().launch().expect_err("missing wrapper");
    match err {
        Error::BinaryNotFound { path, .. } => {
            assert_eq!(path, std::path::Path::new("/nonexistent/valgrind"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn exit_before_the_greeting_fails_at_once_with_status_command_and_output() {
    let _g = shared();
    let stub =
        Stub::new("echo 'qemu-stub: -device nope: bad option' >&2\necho 'to stdout'\nexit 1");
    let mut b = stub.builder();
    // A long greeting deadline: the launch must not wait for it.
    b.greeting_timeout(Duration::from_secs(30))
        .args(["-device", "nope"]);
    let mut m = b.build();
    let started = Instant::now();
    let err = m.launch().expect_err("exit 1");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    match &err {
        Error::LaunchFailed {
            status,
            killed,
            command,
            output,
            cause,
        } => {
            assert_eq!(*status, Some(ExitStatus::Code(1)));
            assert!(!killed);
            assert!(command.ends_with("-device nope"), "{command}");
            assert!(output.contains("bad option"), "{output}");
            assert!(output.contains("to stdout"), "{output}");
            assert!(matches!(**cause, Error::Qmp { .. }), "{cause:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!m.is_running());
    assert_eq!(m.pid(), None);
    assert_eq!(m.exit_status(), Some(ExitStatus::Code(1)));
    assert_eq!(stub.leftovers(), 0, "temp dir rolled back");
    assert!(m.log().is_some_and(|l| l.contains("bad option")));
}

#[test]
fn crash_after_spawn_reports_the_signal() {
    let _g = shared();
    let stub = Stub::new("kill -SEGV $$");
    let mut m = stub.machine();
    let err = m.launch().expect_err("crash");
    match err {
        Error::LaunchFailed { status, killed, .. } => {
            assert_eq!(status.and_then(ExitStatus::signal), Some(libc::SIGSEGV));
            assert!(!killed);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stub.leftovers(), 0);
}

#[test]
fn missing_greeting_times_out_then_kills_and_reaps() {
    let _g = shared();
    let stub = Stub::new("exec sleep 300");
    let mut b = stub.builder();
    b.greeting_timeout(Duration::from_millis(300));
    let mut m = b.build();
    let started = Instant::now();
    let err = m.launch().expect_err("no greeting");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "took {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    match cause_of_killed_launch(&err) {
        Error::Qmp { source, .. } => assert!(
            matches!(
                source,
                machine_core::qmp_client::Error::GreetingTimeout { .. }
            ),
            "{source:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(stub.leftovers(), 0);
}

#[test]
fn a_failed_launch_can_be_retried_on_the_same_machine() {
    let _g = shared();
    let stub = Stub::new(
        "[ -e \"$0.ok\" ] || { touch \"$0.ok\"; exit 2; }\ngreet\nwhile true; do serve_one; done",
    );
    let mut m = stub.machine();
    let err = m.launch().expect_err("first launch fails");
    assert!(
        matches!(
            err,
            Error::LaunchFailed {
                status: Some(ExitStatus::Code(2)),
                ..
            }
        ),
        "{err:?}"
    );
    m.launch().expect("second launch works");
    assert_eq!(
        m.cmd("query-status", ()).expect("query")["status"],
        "running"
    );
    m.shutdown().expect("shutdown");
}

#[test]
fn a_launch_can_be_aborted_by_the_caller_during_the_handshake() {
    use std::io::Write;
    use std::os::fd::AsFd;
    let _g = shared();
    // Never greets: without an abort the launch would wait for the whole greeting deadline.
    let stub = Stub::new("exec sleep 300");
    let mut b = stub.builder();
    b.greeting_timeout(Duration::from_secs(20));
    let mut m = b.build();
    let (abort_r, abort_w) = nix::unistd::pipe().expect("pipe");
    let poker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let mut w = std::fs::File::from(abort_w);
        w.write_all(b"x").expect("poke");
    });
    let started = Instant::now();
    let err = m
        .launch_with_abort(abort_r.as_fd())
        .expect_err("aborted launch");
    let took = started.elapsed();
    poker.join().expect("poker");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let cause = cause_of_killed_launch(&err);
    assert!(matches!(cause, Error::LaunchAborted), "{cause:?}");
    assert!(!m.is_running());
    assert_eq!(stub.leftovers(), 0);
    // The same machine launches normally afterwards (and an idle abort fd changes nothing).
    let serving = Stub::serving();
    let mut ok = serving.builder().build();
    let (idle_r, _idle_w) = nix::unistd::pipe().expect("pipe");
    ok.launch_with_abort(idle_r.as_fd()).expect("launch");
    ok.shutdown().expect("shutdown");
}

/// Catalogue case 1: a binary that exists but is not executable is refused before anything
/// is created, with the reason.
#[test]
fn a_binary_that_is_not_executable_is_reported_before_anything_is_created() {
    use std::os::unix::fs::PermissionsExt;
    let _g = shared();
    let stub = Stub::serving();
    let plain = stub.path().with_file_name("not-executable");
    std::fs::write(&plain, "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut b = MachineBuilder::new(&plain);
    b.base_temp_dir(stub.base());
    let err = b.build().launch().expect_err("not executable");
    match &err {
        Error::BinaryNotFound { path, source } => {
            assert_eq!(path, &plain);
            assert_eq!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied,
                "{source}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("not-executable"), "{err}");
    assert_eq!(stub.leftovers(), 0);
}

/// Catalogue case 6: `qmp_capabilities` answered with an error fails the launch with the
/// negotiation error as cause; the rollback kills and reaps QEMU (which would otherwise keep
/// running) and removes the temp dir, at once rather than at a deadline.
#[test]
fn a_failed_negotiation_kills_qemu_and_rolls_back() {
    let _g = shared();
    let stub = Stub::new(concat!(
        "greet\n",
        "IFS= read -r -d '}' -u $MON cmd\n",
        "printf '{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no capabilities here\"}, \"id\": 1}\\r\\n' >&$MON\n",
        "exec sleep 300",
    ));
    let mut b = stub.builder();
    b.greeting_timeout(Duration::from_secs(20))
        .command_timeout(Duration::from_secs(20));
    let mut m = b.build();
    let started = Instant::now();
    let err = m.launch().expect_err("negotiation refused");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    match cause_of_killed_launch(&err) {
        Error::Qmp { source, .. } => assert!(
            matches!(source, machine_core::qmp_client::Error::Negotiation { .. }),
            "{source:?}"
        ),
        other => panic!("{other:?}"),
    }
    let chain = {
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    };
    assert!(chain.contains("no capabilities here"), "{chain}");
    assert!(!m.is_running());
    assert_eq!(stub.leftovers(), 0, "temp dir rolled back");
}

/// The cause of a launch that failed and was rolled back by SIGKILLing QEMU.
fn cause_of_killed_launch(err: &Error) -> &Error {
    match err {
        Error::LaunchFailed {
            status,
            killed,
            cause,
            ..
        } => {
            assert!(killed, "{err:?}");
            assert_eq!(status.and_then(ExitStatus::signal), Some(libc::SIGKILL));
            cause
        }
        other => panic!("{other:?}"),
    }
}
