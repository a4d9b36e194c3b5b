//! The QEMU child process: spawn with an fd allow-list, a pidfd, and a guard that kills and
//! reaps on drop so QEMU never outlives its owner.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys;

/// How a QEMU process ended: an exit code or a signal (never both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It called `exit(code)`.
    Code(i32),
    /// It was terminated by `signal`.
    Signal {
        /// The signal number (`libc::SIGKILL`, ...).
        signal: i32,
        /// Whether it dumped core.
        core_dumped: bool,
    },
}

impl ExitStatus {
    /// The process is gone but its status could not be collected: the embedding process
    /// ignores SIGCHLD (the kernel then reaps children itself) or reaped it behind our back.
    /// A real exit code is never negative.
    pub const UNKNOWN: ExitStatus = ExitStatus::Code(-1);

    /// The exit code, if it exited normally.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Code(code) => Some(code),
            ExitStatus::Signal { .. } => None,
        }
    }

    /// The terminating signal, if a signal ended it.
    pub fn signal(self) -> Option<i32> {
        match self {
            ExitStatus::Code(_) => None,
            ExitStatus::Signal { signal, .. } => Some(signal),
        }
    }

    /// Exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(-1) => f.write_str("exit status unknown"),
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal {
                signal,
                core_dumped,
            } => {
                write!(f, "signal {signal} ({})", signal_name(*signal))?;
                if *core_dumped {
                    f.write_str(", core dumped")?;
                }
                Ok(())
            }
        }
    }
}

/// A short name for common signals (`SIGKILL`), or `"unknown"`.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS",
        _ => "unknown",
    }
}

/// How often a spawn that failed with ETXTBSY is retried (3, 6, 9 ... ms apart).
const ETXTBSY_RETRIES: u64 = 8;
/// How long `Drop` waits for the child after SIGKILL before giving up (a process stuck in
/// uninterruptible sleep cannot be reaped; we must not hang the caller forever).
const DROP_REAP_BOUND: Duration = Duration::from_secs(10);

/// Owns a spawned child: its pid, its pidfd, and its exit status once reaped.
///
/// Dropping a guard whose child was not reaped sends SIGKILL through the pidfd and reaps it
/// (bounded by [`DROP_REAP_BOUND`]).
pub(crate) struct ChildGuard {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
    sent_signals: Vec<i32>,
}

/// What to spawn and which fds the child keeps.
pub(crate) struct SpawnSpec<'a> {
    pub(crate) argv: &'a [std::ffi::OsString],
    pub(crate) stdout: OwnedFd,
    pub(crate) keep: Vec<RawFd>,
    pub(crate) parent_death_signal: bool,
    pub(crate) new_session: bool,
}

/// Finds `program` like `execvp` would: a path with a slash is taken as is, a bare name is
/// looked up on `PATH`. It must be an executable regular file.
/// Finds `program` like `execvp` would: a path with a slash is taken as is, a bare name is
/// looked up on `PATH`. It must be an executable regular file.
pub(crate) fn resolve_program(program: &Path) -> io::Result<PathBuf> {
    let candidates: Vec<PathBuf> = if program.as_os_str().as_bytes().contains(&b'/') {
        vec![program.to_owned()]
    } else {
        std::env::var_os("PATH")
            .map(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(program))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut last = io::Error::from(io::ErrorKind::NotFound);
    for candidate in candidates {
        match std::fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
                return Ok(candidate)
            }
            Ok(_) => last = io::Error::from(io::ErrorKind::PermissionDenied),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => last = err,
        }
    }
    Err(last)
}

impl ChildGuard {
    /// Spawns `spec.argv` with stdin from /dev/null, stdout and stderr on `spec.stdout`, and
    /// only the fds in `spec.keep` besides those. Our copy of `spec.stdout` is closed before
    /// this returns.
    pub(crate) fn spawn(spec: SpawnSpec<'_>) -> io::Result<ChildGuard> {
        let program = spec
            .argv
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command line"))?;
        let resolved = resolve_program(Path::new(program))?;
        let null = sys::above_stdio(OwnedFd::from(std::fs::File::open("/dev/null")?))?;
        let stdout = sys::above_stdio(spec.stdout)?;
        let sys_spec = sys::SpawnSpec {
            program: resolved.as_os_str(),
            argv: spec.argv,
            stdin: null.as_fd(),
            stdout: stdout.as_fd(),
            keep: &spec.keep,
            parent_death_signal: spec.parent_death_signal,
            new_session: spec.new_session,
        };
        // ETXTBSY is transient in a multithreaded program: a script or binary that one of our
        // threads has just written stays open for writing in any child another thread forked
        // in between, until that child execs. Retry briefly (about 0.1 s in all) instead of
        // failing the launch; any other error is final.
        let mut attempt = 0u64;
        let (pid, pidfd) = loop {
            match sys::spawn(&sys_spec) {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < ETXTBSY_RETRIES => {
                    attempt += 1;
                    log::debug!(
                        "{}: text file busy, retrying the spawn",
                        program.to_string_lossy()
                    );
                    std::thread::sleep(Duration::from_millis(3 * attempt));
                }
                other => break other?,
            }
        };
        Ok(ChildGuard {
            pid,
            pidfd,
            status: None,
            sent_signals: Vec::new(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    pub(crate) fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The exit status once reaped.
    pub(crate) fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// The signals we sent, in order.
    pub(crate) fn sent_signals(&self) -> &[i32] {
        &self.sent_signals
    }

    /// Reaps the child if it has exited (never blocks): `waitid(P_PIDFD)` on its pidfd, so
    /// no other child of ours (or a reused pid) can be collected by mistake. If the child is
    /// no longer ours to wait for (ECHILD: SIGCHLD is ignored and the kernel reaped it, or
    /// someone else did), it has exited with [`ExitStatus::UNKNOWN`].
    pub(crate) fn try_reap(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let status = match sys::reap_pidfd(self.pidfd.as_fd())? {
            sys::Waited::Running => None,
            sys::Waited::Code(code) => Some(ExitStatus::Code(code)),
            sys::Waited::Signal {
                signal,
                core_dumped,
            } => Some(ExitStatus::Signal {
                signal,
                core_dumped,
            }),
            sys::Waited::NotOurs => {
                log::debug!(
                    "qemu pid {} was reaped elsewhere (SIGCHLD ignored?): exit status unknown",
                    self.pid
                );
                Some(ExitStatus::UNKNOWN)
            }
        };
        if let Some(status) = status {
            log::debug!("qemu pid {} exited: {status}", self.pid);
        }
        self.status = status;
        Ok(status)
    }

    /// Sends `signal` through the pidfd; a child that already exited is not an error.
    pub(crate) fn signal(&mut self, signal: i32) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        self.sent_signals.push(signal);
        match sys::pidfd_send_signal(self.pidfd.as_fd(), signal) {
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    /// Waits until the child exits or `deadline` passes, then reaps it. Blocks in poll(2) on
    /// the pidfd: no sleeps, no SIGCHLD.
    pub(crate) fn wait_until(&mut self, deadline: Instant) -> io::Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.try_reap()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            poll_readable(self.pidfd.as_fd(), deadline - now)?;
        }
    }

    /// SIGKILL, then reap within `bound`.
    pub(crate) fn kill_and_reap(&mut self, bound: Duration) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.signal(libc::SIGKILL)?;
        }
        self.wait_until(Instant::now() + bound)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let pid = self.pid;
        match self.kill_and_reap(DROP_REAP_BOUND) {
            Ok(Some(_)) => log::debug!("qemu pid {pid} killed and reaped on drop"),
            Ok(None) => log::error!(
                "qemu pid {pid} did not die within {DROP_REAP_BOUND:?} after SIGKILL; left unreaped"
            ),
            Err(err) => log::error!("cannot kill qemu pid {pid} on drop: {err}"),
        }
    }
}

/// poll(2) one fd for readability for at most `timeout`; EINTR counts as a wake-up.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    match sys::poll_one(fd, false, timeout) {
        Ok(ready) => Ok(ready.readable),
        Err(err) if err.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn_sh(script: &str) -> ChildGuard {
        let (_r, w) = nix::unistd::pipe().expect("pipe");
        let argv: Vec<std::ffi::OsString> = vec!["sh".into(), "-c".into(), script.into()];
        ChildGuard::spawn(SpawnSpec {
            argv: &argv,
            stdout: w,
            keep: Vec::new(),
            parent_death_signal: true,
            new_session: false,
        })
        .expect("spawn")
    }

    /// A program still open for writing cannot be executed (ETXTBSY): the spawn retries for a
    /// while, succeeds once the writer closes, and gives up with the OS error if it never does.
    #[test]
    fn spawn_retries_text_file_busy() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("prog");
        let mut file = std::fs::File::create(&path).expect("create");
        file.write_all(b"#!/bin/sh\nexit 7\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let argv: Vec<std::ffi::OsString> = vec![path.clone().into()];
        let spec = |argv| {
            let (_r, w) = nix::unistd::pipe().expect("pipe");
            SpawnSpec {
                argv,
                stdout: w,
                keep: Vec::new(),
                parent_death_signal: true,
                new_session: false,
            }
        };
        // Never closed while spawning: every retry fails, then the error is ETXTBSY.
        let started = Instant::now();
        let err = match ChildGuard::spawn(spec(&argv)) {
            Err(err) => err,
            Ok(child) => panic!(
                "spawned pid {} while the file was open for writing",
                child.pid()
            ),
        };
        assert_eq!(err.raw_os_error(), Some(libc::ETXTBSY), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(50), "it retried");
        // Closed by another thread 20 ms in: a retry succeeds.
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(file);
        });
        let mut child = ChildGuard::spawn(spec(&argv)).expect("spawn after the writer closed");
        closer.join().expect("closer");
        let status = child
            .wait_until(Instant::now() + Duration::from_secs(10))
            .expect("wait");
        assert_eq!(status, Some(ExitStatus::Code(7)));
    }

    #[test]
    fn exit_code_and_signal_are_told_apart() {
        let mut child = spawn_sh("exit 3");
        let status = child
            .wait_until(Instant::now() + Duration::from_secs(10))
            .expect("wait");
        assert_eq!(status, Some(ExitStatus::Code(3)));
        assert_eq!(status.and_then(|s| s.code()), Some(3));

        let mut child = spawn_sh("kill -SEGV $$");
        let status = child
            .wait_until(Instant::now() + Duration::from_secs(10))
            .expect("wait")
            .expect("exited");
        assert_eq!(status.signal(), Some(libc::SIGSEGV));
        assert!(status.to_string().starts_with("signal 11 (SIGSEGV)"));
    }

    #[test]
    fn wait_until_respects_its_deadline() {
        let mut child = spawn_sh("exec sleep 30");
        let started = Instant::now();
        let status = child
            .wait_until(started + Duration::from_millis(100))
            .expect("wait");
        assert_eq!(status, None);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        let status = child.kill_and_reap(Duration::from_secs(10)).expect("kill");
        assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGKILL));
        assert_eq!(child.sent_signals(), &[libc::SIGKILL]);
    }

    #[test]
    fn drop_kills_and_reaps() {
        let child = spawn_sh("exec sleep 30");
        let pid = child.pid();
        drop(child);
        // Reaped: the pid is no longer our child.
        let err = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(pid as i32),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        )
        .expect_err("already reaped");
        assert_eq!(err, nix::errno::Errno::ECHILD);
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let (_r, w) = nix::unistd::pipe().expect("pipe");
        let argv: Vec<std::ffi::OsString> = vec!["/nonexistent/qemu".into()];
        let err = ChildGuard::spawn(SpawnSpec {
            argv: &argv,
            stdout: w,
            keep: Vec::new(),
            parent_death_signal: true,
            new_session: false,
        })
        .err()
        .expect("spawn fails");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
