//! What a person reads when something is wrong: each message names what failed and why, and
//! each maps to its exit status.

use std::os::unix::fs::PermissionsExt;

use crate::util::run;

/// The `qemu-machine: ...` lines and the rest of stderr.
fn first_line(stderr: &str) -> &str {
    stderr.lines().next().unwrap_or_default()
}

#[test]
fn a_regular_file_is_not_a_socket() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("plain");
    std::fs::write(&file, b"").expect("file");
    let path = file.to_str().expect("utf-8");
    for args in [
        vec!["qmp", path, "query-status"],
        vec!["events", path],
        vec!["shell", path],
        vec!["qom", path, "list"],
    ] {
        let r = run(&args, "", &[]);
        r.expect_code(3);
        assert_eq!(
            first_line(&r.stderr),
            format!(
                "qemu-machine: {path} is not a socket (a QMP server address is a unix socket \
                 path or host:port)"
            ),
            "{args:?}"
        );
    }
}

#[test]
fn host_with_a_bad_port_says_the_port_is_invalid() {
    let r = run(&["qmp", "localhost:notaport", "query-status"], "", &[]);
    r.expect_code(2);
    assert_eq!(
        first_line(&r.stderr),
        "qemu-machine: invalid port `notaport` in `localhost:notaport` (expected host:PORT \
         with PORT from 1 to 65535, or a unix socket path)"
    );
}

#[test]
fn a_bad_log_file_is_a_usage_error_found_before_connecting() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("missing-dir").join("log");
    let log = log.to_str().expect("utf-8");
    let r = run(&["shell", "-l", log, "/nonexistent/qmp.sock"], "", &[]);
    r.expect_code(2);
    assert_eq!(
        first_line(&r.stderr),
        format!("qemu-machine: cannot open log file {log}: No such file or directory (os error 2)")
    );
}

/// A monitor that accepts the connection but never greets (QEMU does that while another client
/// holds its `-qmp` socket): the timeout says so, and how to share a monitor.
#[test]
fn no_greeting_explains_one_client_per_monitor() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("busy.sock");
    // Bound and listening, never accepted: connect() succeeds, no greeting ever comes.
    let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let addr = path.to_str().expect("utf-8");
    let r = run(
        &["qmp", "--connect-timeout", "200ms", addr, "query-status"],
        "",
        &[],
    );
    r.expect_code(3);
    assert_eq!(
        first_line(&r.stderr),
        format!(
            "qemu-machine: cannot connect to QMP server at {addr}: no QMP greeting within 200ms"
        )
    );
    assert!(
        r.stderr
            .contains("QEMU serves one client at a time on each -qmp socket"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("mux=on"), "{}", r.stderr);
}

/// QEMU refusing its arguments: its exit status and its own message come first, without the
/// handshake's internals.
#[test]
fn a_launch_failure_shows_qemus_message_and_status_first() {
    let dir = tempfile::tempdir().expect("dir");
    let stub = dir.path().join("qemu-stub");
    std::fs::write(
        &stub,
        "#!/bin/sh\necho 'qemu-system-x86_64: -bogus: invalid option' >&2\nexit 1\n",
    )
    .expect("write stub");
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let stub = stub.to_str().expect("utf-8");
    let r = run(&["run", "--qemu", stub, "--", "-bogus"], "", &[]);
    r.expect_code(4);
    // One line: no "caused by" about the handshake QEMU's exit cut short.
    assert_eq!(
        r.stderr.trim_end(),
        format!(
            "qemu-machine: cannot launch {stub}: qemu exited during launch (exit code 1): \
             qemu-system-x86_64: -bogus: invalid option"
        )
    );
}
