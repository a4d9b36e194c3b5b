//! The one system call the benchmarks need that nix does not offer here: a CPU-time clock read
//! to the nanosecond and up to date for the running thread (`clock_gettime`).

use std::time::Duration;

/// Which CPU-time clock to read.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The calling thread's.
    Thread,
    /// The whole process's.
    Process,
}

/// The CPU time `clock` has counted so far. Unlike `getrusage` and `/proc/.../schedstat`,
/// which lag the running thread by up to a scheduler tick (4 ms here), this includes the time
/// since the last tick. `None` if the clock cannot be read.
pub fn cpu_time(clock: Clock) -> Option<Duration> {
    let id = match clock {
        Clock::Thread => libc::CLOCK_THREAD_CPUTIME_ID,
        Clock::Process => libc::CLOCK_PROCESS_CPUTIME_ID,
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call, and `id` is
    // one of the clock ids the C library defines.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}
