//! Everything else: completions, usage errors, and QEMU missing for `run` and `wrap`.

use crate::util::run;

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let r = run(&["completions", shell], "", &[]);
        r.expect_code(0);
        assert!(r.stdout.contains("qemu-machine"), "{shell}");
        assert!(r.stdout.contains("shell"), "{shell}");
    }
}

#[test]
fn usage_errors_are_status_2() {
    for args in [
        vec![],
        vec!["frobnicate"],
        vec!["qmp"],
        vec!["events"],
        vec!["run", "--accel", "warp"],
        vec!["run", "--timeout", "soon"],
        vec!["wrap"],
    ] {
        let r = run(&args, "", &[]);
        r.expect_code(2);
    }
}

#[test]
fn qemu_missing_is_status_4() {
    let r = run(
        &[
            "run",
            "--qemu",
            "/nonexistent/qemu-system-x86_64",
            "--exit-after-banner",
        ],
        "",
        &[],
    );
    r.expect_code(4);
    assert!(
        r.stderr.contains("/nonexistent/qemu-system-x86_64"),
        "{}",
        r.stderr
    );
    assert_eq!(
        r.stderr
            .lines()
            .filter(|l| l.starts_with("qemu-machine:"))
            .count(),
        1
    );

    let r = run(
        &[
            "wrap",
            "--qemu",
            "/nonexistent/qemu-system-x86_64",
            "--",
            "-M",
            "none",
        ],
        "",
        &[],
    );
    r.expect_code(4);
    assert!(
        r.stderr.contains("/nonexistent/qemu-system-x86_64"),
        "{}",
        r.stderr
    );
}

/// QEMU unlinks whatever sits at a `-qmp unix:PATH,server=on` path before it binds (measured
/// on QEMU 7.2: a regular file there became the socket). The stub does the same, and notes
/// that it ran: `run` must refuse an existing non-socket path before starting QEMU at all.
#[test]
fn qmp_listen_on_an_existing_file_is_refused_before_qemu_starts() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let ran = dir.path().join("stub-ran");
    let stub = dir.path().join("qemu-stub");
    std::fs::write(
        &stub,
        format!(
            "#!/bin/sh\ntouch '{}'\nfor a in \"$@\"; do case \"$a\" in unix:*) p=${{a#unix:}}; rm -f \"${{p%%,server=on*}}\";; esac; done\nexit 1\n",
            ran.display()
        ),
    )
    .expect("write stub");
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, b"user data").expect("write");
    let r = run(
        &[
            "run",
            "--qemu",
            stub.to_str().expect("utf-8"),
            "--qmp-listen",
            precious.to_str().expect("utf-8"),
            "--",
            "-M",
            "none",
        ],
        "",
        &[],
    );
    assert_eq!(
        std::fs::read(&precious).expect("the user's file is still there"),
        b"user data"
    );
    r.expect_code(2);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    assert!(!ran.exists(), "qemu was started");
    // A symlink (even a dangling one) is refused the same way.
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).expect("symlink");
    let r = run(
        &[
            "run",
            "--qemu",
            stub.to_str().expect("utf-8"),
            "--qmp-listen",
            link.to_str().expect("utf-8"),
            "--",
            "-M",
            "none",
        ],
        "",
        &[],
    );
    r.expect_code(2);
    assert!(std::fs::symlink_metadata(&link).is_ok(), "symlink removed");
    assert!(!ran.exists(), "qemu was started");
}

/// Ctrl-C (or SIGTERM) while QEMU has not greeted yet ends `run` at once, with QEMU killed,
/// instead of waiting out the launch deadline.
#[test]
fn a_signal_during_a_slow_launch_ends_run_at_once() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("dir");
    let stub = dir.path().join("qemu-stub");
    let pidfile = dir.path().join("stub.pid");
    // Writes its pid, then never greets.
    std::fs::write(
        &stub,
        format!(
            "#!/bin/sh\necho $$ > '{}'\nexec sleep 300\n",
            pidfile.display()
        ),
    )
    .expect("write stub");
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        let _ = std::fs::remove_file(&pidfile);
        let mut child = Command::new(env!("CARGO_BIN_EXE_qemu-machine"))
            .args(["run", "--qemu"])
            .arg(&stub)
            .args(["--launch-timeout", "20s", "--", "-M", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);
        let qemu_pid: i32 = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break pid;
            }
            assert!(Instant::now() < deadline, "the stub never started");
            std::thread::sleep(Duration::from_millis(5));
        };
        let sent = Instant::now();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)
            .expect("signal");
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if sent.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("run did not end within 15 s of {signal}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = sent.elapsed();
        let mut stderr = String::new();
        use std::io::Read;
        let _ = child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr);
        assert!(
            took < Duration::from_secs(3),
            "{signal}: took {took:?}: {stderr}"
        );
        assert_eq!(status.code(), Some(130), "{signal}: {stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        assert!(
            !std::path::Path::new(&format!("/proc/{qemu_pid}")).exists(),
            "the stub QEMU survived"
        );
    }
}

/// QMP has no authentication: `--qmp-listen` on a non-loopback TCP address is refused before
/// QEMU starts (fault catalogue D40) unless `--allow-remote-qmp` says otherwise.
#[test]
fn qmp_listen_on_a_non_loopback_address_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let ran = dir.path().join("stub-ran");
    let stub = dir.path().join("qemu-stub");
    std::fs::write(
        &stub,
        format!("#!/bin/sh\ntouch '{}'\nexit 1\n", ran.display()),
    )
    .expect("write stub");
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let stub = stub.to_str().expect("utf-8");
    for address in ["0.0.0.0:4444", "[::]:4444", "tcp:0.0.0.0:4444"] {
        let r = run(
            &[
                "run",
                "--qemu",
                stub,
                "--qmp-listen",
                address,
                "--",
                "-M",
                "none",
            ],
            "",
            &[],
        );
        r.expect_code(2);
        assert!(r.stderr.contains("loopback"), "{address}: {}", r.stderr);
        assert!(!ran.exists(), "qemu was started for {address}");
    }
    // Loopback is fine (the stub then fails the launch: status 4), and so is an explicit
    // override.
    for args in [
        vec!["--qmp-listen", "127.0.0.1:4444"],
        vec!["--qmp-listen", "localhost:4444"],
        vec!["--qmp-listen", "0.0.0.0:4444", "--allow-remote-qmp"],
    ] {
        let _ = std::fs::remove_file(&ran);
        let mut all = vec!["run", "--qemu", stub];
        all.extend(args.iter().copied());
        all.extend(["--", "-M", "none"]);
        let r = run(&all, "", &[]);
        r.expect_code(4);
        assert!(ran.exists(), "{args:?}: qemu was not started");
    }
}
