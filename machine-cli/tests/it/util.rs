//! Shared helpers: run the binary with a deadline, and start fake QMP servers on a path.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use machine_core::qmp_client::testing::{FakeServer, Script};

/// What a run of the binary gave.
#[derive(Debug)]
pub struct Run {
    /// The exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// How long it took.
    pub elapsed: Duration,
}

impl Run {
    /// Fails the test unless the run exited with `code`, showing its output.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit status\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "the binary panicked:\n{}",
            self.stderr
        );
        self
    }

    /// Standard output split into lines.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

/// Runs `qemu-machine ARGS` with `stdin` piped in, `env` set, and a 20 s deadline (killed and
/// failed after that).
pub fn run(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Run {
    let started = Instant::now();
    let mut command = Command::new(env!("CARGO_BIN_EXE_qemu-machine"));
    command
        .args(args)
        .env_remove("QMP_SOCKET")
        .env_remove("RUST_LOG")
        .env("HOME", std::env::temp_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn qemu-machine");
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_string();
    let writer = thread::spawn(move || {
        // The binary may exit before reading everything: a broken pipe is fine.
        let _ = input.write_all(stdin.as_bytes());
    });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = started + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qemu-machine {args:?} did not exit within 20 s");
        }
        thread::sleep(Duration::from_millis(2));
    };
    let elapsed = started.elapsed();
    writer.join().expect("stdin writer");
    Run {
        code: status.code(),
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
        elapsed,
    }
}

/// A temporary directory with a socket path in it, and a fake server listening there.
pub struct Served {
    /// The server.
    pub server: FakeServer,
    /// The socket path.
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    /// The socket path as text, for the command line.
    pub fn addr(&self) -> &str {
        self.path.to_str().expect("utf-8 temp path")
    }
}

/// Starts `script` on a fresh unix socket path.
pub fn serve(script: Script) -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qmp.sock");
    let server = script.start_unix(&path).expect("start fake server");
    Served {
        server,
        path,
        _dir: dir,
    }
}

/// A socket path where nothing listens.
pub fn dead_path(dir: &Path) -> String {
    dir.join("nobody.sock").to_string_lossy().into_owned()
}
