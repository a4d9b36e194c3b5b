//! The only place with `unsafe`: pidfds, the child's fd allow-list and parent-death signal.
//!
//! Everything here is a thin, documented wrapper over one Linux system call; the types above
//! it are safe. The `pre_exec` hook runs in the forked child, so it only makes
//! async-signal-safe system calls and never allocates.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Opens a pidfd for `pid` (`pidfd_open(2)`, Linux 5.3+). The fd is close-on-exec.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and a flags word and returns a new fd or -1; it touches
    // no memory of ours.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "fd out of range"))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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

/// What the child must look like just before `exec`.
pub(crate) struct ChildSetup {
    /// Fds (by their number in the parent, which is also their number in the child) that
    /// QEMU inherits besides stdin, stdout and stderr.
    pub(crate) keep: Vec<RawFd>,
    /// Send SIGKILL to the child when the spawning thread exits (`PR_SET_PDEATHSIG`).
    pub(crate) parent_death_signal: bool,
}

/// Installs the `pre_exec` hook that applies `setup` in the child.
///
/// In the child, after std has set up fds 0-2: (1) optionally `PR_SET_PDEATHSIG(SIGKILL)`,
/// then a check that the parent is still the one that forked us; (2) every fd from 3 upwards
/// is marked close-on-exec (`close_range(3, ~0, CLOSE_RANGE_CLOEXEC)`, with an fcntl loop
/// as the fallback on kernels older than 5.11); (3) close-on-exec is cleared on exactly the
/// fds in `keep`. Marking instead of closing leaves std's own exec-error pipe working, so a
/// failed `exec` is still reported as a spawn error.
pub(crate) fn install_child_setup(command: &mut Command, setup: ChildSetup) {
    // Computed in the parent: the child must not allocate or read /proc.
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let fd_limit = open_fd_limit();
    let ChildSetup {
        keep,
        parent_death_signal,
    } = setup;
    let hook = move || -> io::Result<()> {
        if parent_death_signal {
            // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on the calling process.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would ever
            // deliver the signal, so give up now.
            // SAFETY: getppid has no preconditions.
            if unsafe { libc::getppid() } != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes fd flags of this process.
        let marked = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        if marked != 0 {
            for fd in 3..fd_limit {
                // SAFETY: F_SETFD on any number is harmless; EBADF for closed ones is ignored.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
        for &fd in &keep {
            // SAFETY: clears FD_CLOEXEC on an fd the parent owns and handed to us on purpose.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe system calls (prctl, getppid,
    // close_range, fcntl) and does not allocate: `keep` was allocated before the fork.
    unsafe {
        command.pre_exec(hook);
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

    #[test]
    fn pidfd_of_a_child_signals_it() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pidfd = pidfd_open(child.id()).expect("pidfd_open");
        pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL).expect("signal");
        let status = child.wait().expect("wait");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // The process is reaped: signalling through the pidfd now reports ESRCH, never
        // another process.
        let err = pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL).expect_err("reaped");
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }

    #[test]
    fn pidfd_open_of_a_missing_pid_fails() {
        let err = pidfd_open(u32::MAX).expect_err("out of range");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = pidfd_open(i32::MAX as u32).expect_err("no such pid");
        assert!(matches!(
            err.raw_os_error(),
            Some(libc::ESRCH) | Some(libc::EINVAL)
        ));
    }
}
