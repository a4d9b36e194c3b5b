//! Shared helpers: run the binary with a deadline, and start fake QMP servers on a path.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
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

/// A run of the binary whose stdout is read line by line while it runs, so a test can wait
/// for the binary to reach a point before driving the fake server further.
pub struct Live {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// Each stderr line as it comes (the reader thread also keeps them all).
    err_lines: mpsc::Receiver<String>,
    stderr: thread::JoinHandle<String>,
    started: Instant,
}

impl Live {
    /// Starts `qemu-machine ARGS` with stdin closed.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Live {
        let mut command = Command::new(env!("CARGO_BIN_EXE_qemu-machine"));
        command
            .args(args)
            .env_remove("QMP_SOCKET")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let started = Instant::now();
        let mut child = command.spawn().expect("spawn qemu-machine");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let (err_tx, err_lines) = mpsc::channel();
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            for line in BufReader::new(&mut stderr).lines() {
                let Ok(line) = line else { break };
                s.push_str(&line);
                s.push('\n');
                let _ = err_tx.send(line);
            }
            s
        });
        Live {
            child,
            lines,
            seen: Vec::new(),
            err_lines,
            stderr,
            started,
        }
    }

    /// Waits (10 s at most) for a stderr line containing `needle`.
    pub fn wait_stderr(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.err_lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(e) => {
                    let _ = self.child.kill();
                    panic!("no stderr line with {needle:?} within 10 s ({e})");
                }
            }
        }
    }

    /// The process id, for sending it signals.
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// The next stdout line, waiting up to 10 s for it.
    pub fn next_line(&mut self) -> String {
        match self.lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => {
                self.seen.push(line.clone());
                line
            }
            Err(e) => {
                let _ = self.child.kill();
                panic!("no output line within 10 s ({e}); so far: {:?}", self.seen);
            }
        }
    }

    /// Waits (20 s at most) for the exit and returns everything it printed.
    pub fn finish(mut self) -> Run {
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "qemu-machine did not exit within 20 s; stdout so far: {:?}",
                    self.seen
                );
            }
            thread::sleep(Duration::from_millis(2));
        };
        let elapsed = self.started.elapsed();
        // The reader thread ends at EOF, so the channel drains completely.
        self.seen.extend(self.lines.iter());
        let mut stdout = self.seen.join("\n");
        if !stdout.is_empty() {
            stdout.push('\n');
        }
        Run {
            code: status.code(),
            stdout,
            stderr: self.stderr.join().expect("stderr reader"),
            elapsed,
        }
    }
}

/// Waits until the client has negotiated with `server` (its first command).
pub fn wait_negotiated(server: &FakeServer) {
    let commands = server.wait_commands(1, Duration::from_secs(10));
    assert_eq!(
        commands.first().map(|c| c.execute.as_str()),
        Some("qmp_capabilities"),
        "the client never negotiated"
    );
}

/// The binary running with a pseudo-terminal as its controlling terminal (started through
/// `setsid -c`, as in a real login), with what it writes collected by a thread. Killed and
/// reaped on drop if the test fails half-way.
pub struct Terminal {
    child: Child,
    master: std::fs::File,
    output: mpsc::Receiver<Vec<u8>>,
    /// Everything the terminal has shown so far.
    pub seen: String,
}

impl Terminal {
    /// Starts `qemu-machine ARGS` with `envs` (plus `TERM=xterm`) on a new pty.
    pub fn spawn(args: &[&std::ffi::OsStr], envs: &[(&str, &std::ffi::OsStr)]) -> Terminal {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        // openpty(3) leaves both ends inheritable: keep close-on-exec copies only, so that no
        // child keeps the master open (the program would then never see its terminal hang up).
        let master = std::fs::File::from(pty.master.try_clone().expect("dup master"));
        let slave = pty.slave.try_clone().expect("dup slave");
        drop(pty);
        let mut command = Command::new("setsid");
        command
            .arg("-c")
            .arg(env!("CARGO_BIN_EXE_qemu-machine"))
            .args(args)
            .env("TERM", "xterm")
            .stdin(Stdio::from(slave.try_clone().expect("dup slave")))
            .stdout(Stdio::from(slave.try_clone().expect("dup slave")))
            .stderr(Stdio::from(slave));
        for (key, value) in envs {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn setsid -c qemu-machine");
        drop(command);
        let mut reader = master.try_clone().expect("dup master");
        let (tx, output) = mpsc::channel::<Vec<u8>>();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the child has exited and the slave is closed.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        Terminal {
            child,
            master,
            output,
            seen: String::new(),
        }
    }

    /// Reads the terminal until `done(seen)` holds; panics naming `what` after 10 s.
    pub fn wait_until(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.seen.push_str(&String::from_utf8_lossy(&chunk)),
                Err(_) => panic!("{what} not seen on the terminal; got {:?}", self.seen),
            }
        }
    }

    /// Reads the terminal until it has shown `needle`.
    pub fn wait_for(&mut self, needle: &str) {
        self.wait_until(&format!("{needle:?}"), |seen| seen.contains(needle));
    }

    /// Types these bytes.
    pub fn type_bytes(&mut self, bytes: &[u8]) {
        self.master
            .write_all(bytes)
            .expect("typing on the terminal");
    }

    /// Waits up to `timeout` for the program to exit (panics naming `after` otherwise).
    pub fn wait_exit(&mut self, timeout: Duration, after: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after {after}: {:?}",
                self.seen
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Collects the rest of the output until the terminal hangs up (or `timeout` of silence).
    pub fn read_to_hangup(&mut self, timeout: Duration) {
        while let Ok(chunk) = self.output.recv_timeout(timeout) {
            self.seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
