//! The only place with `unsafe` or nix calls: spawning QEMU (vfork-style `clone` with a pidfd),
//! the child's fd allow-list and parent-death signal, signalling and reaping through the
//! pidfd, poll(2) on one fd, pipes and fd flags.
//!
//! Everything here is a thin, documented wrapper over Linux system calls; the types above it
//! are safe. The child half of [`spawn`] runs on its own small stack in our address space
//! (`CLONE_VM | CLONE_VFORK`, what `posix_spawn` does), so it makes only async-signal-safe
//! system calls, never allocates and never panics.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// What a non-blocking `waitid(P_PIDFD)` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waited {
    /// Still running (or stopped).
    Running,
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal { signal: i32, core_dumped: bool },
    /// Not ours to wait for (ECHILD: SIGCHLD is ignored and the kernel reaped it, or someone
    /// else did).
    NotOurs,
}

/// Reaps the process behind `pidfd` if it has exited, without blocking (`waitid(P_PIDFD,
/// WEXITED | WNOHANG)`, retried on EINTR): no other child, and no reused pid, can be
/// collected by mistake.
pub(crate) fn reap_pidfd(pidfd: BorrowedFd<'_>) -> io::Result<Waited> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    loop {
        return match waitid(
            Id::PIDFd(pidfd),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
        ) {
            Ok(WaitStatus::Exited(_, code)) => Ok(Waited::Code(code)),
            Ok(WaitStatus::Signaled(_, signal, core_dumped)) => Ok(Waited::Signal {
                signal: signal as i32,
                core_dumped,
            }),
            Ok(_) => Ok(Waited::Running),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::ECHILD) => Ok(Waited::NotOurs),
            Err(errno) => Err(io::Error::from(errno)),
        };
    }
}

/// What [`poll_one`] found ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Ready {
    /// Input, end-of-file, a hang-up or an error is waiting (a read reports which).
    pub(crate) readable: bool,
    /// A write would not block.
    pub(crate) writable: bool,
}

/// poll(2) on one fd, for reading and, with `write`, writing, for at most `timeout` (rounded
/// up to whole milliseconds, so a sub-millisecond remainder waits instead of spinning).
/// Nothing ready within the timeout is `Ready::default()`; EINTR is an
/// [`io::ErrorKind::Interrupted`] error.
pub(crate) fn poll_one(fd: BorrowedFd<'_>, write: bool, timeout: Duration) -> io::Result<Ready> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut events = PollFlags::POLLIN;
    if write {
        events |= PollFlags::POLLOUT;
    }
    let ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd, events)];
    poll(&mut fds, timeout).map_err(io::Error::from)?;
    let got = fds[0].revents().unwrap_or(PollFlags::empty());
    Ok(Ready {
        readable: got.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR),
        writable: got.contains(PollFlags::POLLOUT),
    })
}

/// A pipe whose both ends are close-on-exec.
pub(crate) fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Sets `O_NONBLOCK` on `fd`, keeping its other status flags.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// Sets close-on-exec on `fd`: no child spawned by this process inherits it unless asked to.
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(drop)
        .map_err(io::Error::from)
}

/// Sends `signal` to the process behind `pidfd` (`pidfd_send_signal(2)`): no PID-reuse race,
/// the signal can only reach the process the pidfd was opened for.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: the info pointer is null (the kernel fills in a default siginfo) and the fd is
    // borrowed, so it stays open for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `fd` itself if its number is 3 or above, else a close-on-exec duplicate at the lowest free
/// number from 3 up (`F_DUPFD_CLOEXEC`), the original closed. Every fd a child gets (and its
/// stdio sources) must sit there: if the embedding process closed its own stdin, stdout or
/// stderr, a new socket or pipe can land on 0-2, and the child's `dup2` onto its stdio would
/// clobber it.
pub(crate) fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() >= 3 {
        return Ok(fd);
    }
    dup_above_stdio(fd.as_fd())
}

/// A close-on-exec duplicate of `fd` numbered 3 or above (`F_DUPFD_CLOEXEC`).
pub(crate) fn dup_above_stdio(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a borrowed open fd has no memory effects.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// What to run and which fds it gets.
pub(crate) struct SpawnSpec<'a> {
    /// The resolved program path given to `execve`.
    pub(crate) program: &'a OsStr,
    /// The full argv, element 0 included.
    pub(crate) argv: &'a [std::ffi::OsString],
    /// Becomes fd 0.
    pub(crate) stdin: BorrowedFd<'a>,
    /// Becomes fds 1 and 2.
    pub(crate) stdout: BorrowedFd<'a>,
    /// Fds (by their number here, which is also their number in the child) the child keeps.
    pub(crate) keep: &'a [RawFd],
    /// `PR_SET_PDEATHSIG(SIGKILL)` in the child.
    pub(crate) parent_death_signal: bool,
    /// `setsid()` in the child: its own session and process group, so a terminal's Ctrl-C
    /// (SIGINT to the foreground process group) does not reach it.
    pub(crate) new_session: bool,
}

/// Everything the child reads, prepared by the parent (the child must not allocate).
struct ChildContext {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdin: RawFd,
    stdout: RawFd,
    keep: *const RawFd,
    keep_len: usize,
    parent_death_signal: bool,
    new_session: bool,
    parent: libc::pid_t,
    fd_limit: RawFd,
    /// Set by the child when a step or `execve` fails (shared memory: `CLONE_VM`).
    errno: AtomicI32,
}

const CHILD_STACK: usize = 64 * 1024;

/// Spawns `spec` and returns its pid and a pidfd for it (`CLONE_PIDFD`: no window in which
/// the pid could be reused).
///
/// In the child: signal handlers back to default and an empty signal mask (as std's
/// `Command`), optionally `PR_SET_PDEATHSIG(SIGKILL)` plus a check that the parent is still
/// the one that forked us, optionally `setsid()`, stdin/stdout/stderr from `spec`, every fd from 3 up marked
/// close-on-exec (`close_range(3, ~0, CLOSE_RANGE_CLOEXEC)`, an fcntl loop on kernels older
/// than 5.11) and close-on-exec cleared on exactly the fds in `spec.keep`, then `execve`.
/// A failure of any step is reported as this function's error, after the child is reaped.
pub(crate) fn spawn(spec: &SpawnSpec<'_>) -> io::Result<(libc::pid_t, OwnedFd)> {
    let nul = || io::Error::new(io::ErrorKind::InvalidInput, "nul byte in an argument");
    let program = CString::new(spec.program.as_bytes()).map_err(|_| nul())?;
    let argv_owned: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| nul())?;
    let env_owned: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let argv = null_terminated(&argv_owned);
    let envp = null_terminated(&env_owned);
    let keep: Vec<RawFd> = spec.keep.to_vec();
    // The child dup2s onto 0, 1 and 2 first: a source there would be clobbered.
    if [spec.stdin.as_raw_fd(), spec.stdout.as_raw_fd()]
        .iter()
        .chain(&keep)
        .any(|&fd| fd < 3)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an fd for the child is numbered below 3",
        ));
    }
    let context = ChildContext {
        program: program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        stdin: spec.stdin.as_raw_fd(),
        stdout: spec.stdout.as_raw_fd(),
        keep: keep.as_ptr(),
        keep_len: keep.len(),
        parent_death_signal: spec.parent_death_signal,
        new_session: spec.new_session,
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        fd_limit: open_fd_limit(),
        errno: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down: hand over its 16-byte aligned top.
    let top = {
        let end = stack.as_mut_ptr() as usize + stack.len();
        (end & !15) as *mut libc::c_void
    };
    let mut pidfd: libc::c_int = -1;

    // Block every signal while the child shares our memory: a handler of ours must never
    // run on the child's stack. The child unblocks after resetting the handlers.
    // SAFETY: sigset_t is plain data; sigfillset initialises it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live, initialised sigset_t values.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: `child_main` only reads `context` (alive until the child has exec'd or exited:
    // CLONE_VFORK suspends us until then) and makes async-signal-safe system calls on the
    // 64 KiB stack we own above. CLONE_PIDFD writes the pidfd into `pidfd`.
    let pid = unsafe {
        libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
            &context as *const ChildContext as *mut libc::c_void,
            &mut pidfd as *mut libc::c_int,
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    // SAFETY: CLONE_PIDFD succeeded with the clone, so `pidfd` is a new fd owned by nobody
    // else (close-on-exec, as pidfds always are).
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let errno = context.errno.load(Ordering::SeqCst);
    if errno != 0 {
        // The child exited without exec: collect it so no zombie remains (through its pidfd;
        // retried on EINTR; ECHILD means the kernel reaped it already: SIGCHLD ignored).
        while let Err(nix::errno::Errno::EINTR) = nix::sys::wait::waitid(
            nix::sys::wait::Id::PIDFd(pidfd.as_fd()),
            nix::sys::wait::WaitPidFlag::WEXITED,
        ) {}
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok((pid, pidfd))
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The child: runs between `clone` and `execve`. Async-signal-safe system calls only.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildContext`, alive while the parent is suspended.
    let ctx = unsafe { &*(arg as *const ChildContext) };
    let fail = |ctx: &ChildContext| -> libc::c_int {
        // SAFETY: __errno_location returns this thread's errno slot (shared with the
        // suspended parent thread; it is only read here).
        let errno = unsafe { *libc::__errno_location() };
        ctx.errno.store(
            if errno == 0 { libc::EINVAL } else { errno },
            Ordering::SeqCst,
        );
        // SAFETY: _exit ends the child without running any of the parent's atexit code.
        unsafe { libc::_exit(127) }
    };
    // SAFETY (whole block): each call is a plain system call wrapper on values prepared by
    // the parent; none allocates or takes a lock.
    unsafe {
        // Default dispositions for every caught signal (ignored ones stay ignored, except
        // SIGPIPE which std's Command also resets), then an empty mask.
        for signal in 1..=libc::SIGRTMAX() {
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut current) != 0 {
                continue;
            }
            let handler = current.sa_sigaction;
            if handler != libc::SIG_DFL && (handler != libc::SIG_IGN || signal == libc::SIGPIPE) {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        if ctx.parent_death_signal {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return fail(ctx);
            }
            // The parent may have died before prctl: then nobody delivers the signal.
            if libc::getppid() != ctx.parent {
                *libc::__errno_location() = libc::ESRCH;
                return fail(ctx);
            }
        }
        if ctx.new_session && libc::setsid() < 0 {
            return fail(ctx);
        }
        if libc::dup2(ctx.stdin, 0) < 0
            || libc::dup2(ctx.stdout, 1) < 0
            || libc::dup2(ctx.stdout, 2) < 0
        {
            return fail(ctx);
        }
        // dup2 onto the same number keeps the old flags: if our /dev/null or pipe happened to
        // be fd 0, 1 or 2 already, it may still be close-on-exec. Clear it on all three.
        for fd in 0..3 {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return fail(ctx);
            }
        }
        let marked = libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if marked != 0 {
            for fd in 3..ctx.fd_limit {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        for i in 0..ctx.keep_len {
            let fd = *ctx.keep.add(i);
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return fail(ctx);
            }
        }
        libc::execve(ctx.program, ctx.argv, ctx.envp);
        fail(ctx)
    }
}

/// The fd-number bound for the fallback loop: the soft `RLIMIT_NOFILE`, capped.
fn open_fd_limit() -> RawFd {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if ok {
        RawFd::try_from(limit.rlim_cur.min(1 << 20)).unwrap_or(1 << 20)
    } else {
        1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn devnull() -> std::fs::File {
        std::fs::File::open("/dev/null").expect("/dev/null")
    }

    #[test]
    fn spawned_child_can_be_signalled_through_its_pidfd() {
        let null = devnull();
        let argv = ["sleep".into(), "30".into()];
        let (pid, pidfd) = spawn(&SpawnSpec {
            program: OsStr::new("/bin/sleep"),
            argv: &argv,
            stdin: null.as_fd(),
            stdout: null.as_fd(),
            keep: &[],
            parent_death_signal: true,
            new_session: true,
        })
        .expect("spawn");
        // Its own session: the session id is its pid.
        let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).expect("getsid");
        assert_eq!(sid.as_raw(), pid);
        pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL).expect("signal");
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).expect("wait");
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Signaled(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
                false
            )
        );
        // Reaped: the pidfd now reports ESRCH, it never reaches another process.
        let err = pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL).expect_err("reaped");
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }

    #[test]
    fn exec_failure_is_an_error_and_leaves_no_zombie() {
        let null = devnull();
        let argv = ["missing".into()];
        let err = spawn(&SpawnSpec {
            program: OsStr::new("/nonexistent/program"),
            argv: &argv,
            stdin: null.as_fd(),
            stdout: null.as_fd(),
            keep: &[],
            parent_death_signal: false,
            new_session: false,
        })
        .expect_err("exec fails");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn nul_bytes_in_arguments_are_refused() {
        let null = devnull();
        let argv = ["a\0b".into()];
        let err = spawn(&SpawnSpec {
            program: OsStr::new("/bin/true"),
            argv: &argv,
            stdin: null.as_fd(),
            stdout: null.as_fd(),
            keep: &[],
            parent_death_signal: false,
            new_session: false,
        })
        .expect_err("nul");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
