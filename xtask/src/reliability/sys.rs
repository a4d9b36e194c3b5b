//! The OS-level measurements of the reliability harness: /proc scans (children, zombies, open
//! fds, memory), signals, and the leak check that runs around every figure.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Our child processes (zombies included) from /proc: pid -> (comm, state letter).
pub fn children() -> BTreeMap<i32, (String, char)> {
    let me = std::process::id() as i32;
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some((comm, state, ppid)) = stat(pid) {
            if ppid == me {
                found.insert(pid, (comm, state));
            }
        }
    }
    found
}

/// `(comm, state, ppid)` of `pid` from /proc/PID/stat; None when it is gone.
pub fn stat(pid: i32) -> Option<(String, char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

/// The open fds of `pid` (`"self"` for us): fd -> link target.
pub fn fds_of(pid: &str) -> BTreeMap<i32, String> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return fds;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(entry.path()) {
            fds.insert(fd, target.display().to_string());
        }
    }
    if pid == "self" {
        // The listing's own directory fd is open only while read_dir runs.
        fds.retain(|fd, _| Path::new(&format!("/proc/self/fd/{fd}")).exists());
    }
    fds
}

/// Our open fds.
pub fn open_fds() -> BTreeMap<i32, String> {
    fds_of("self")
}

/// A field of /proc/self/status in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Current resident set size in bytes.
pub fn rss_bytes() -> u64 {
    status_kib("VmRSS") * 1024
}

/// Peak resident set size (since the last [`reset_peak_rss`]) in bytes.
pub fn peak_rss_bytes() -> u64 {
    status_kib("VmHWM") * 1024
}

/// Returns freed heap memory to the kernel, then resets the peak RSS (`/proc/self/clear_refs`
/// value 5) so that [`peak_rss_bytes`] measures from now on. False if the reset failed.
pub fn reset_peak_rss() -> bool {
    trim_heap();
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Gives free heap pages back to the kernel, so that a following measurement starts from
/// memory in use rather than memory the allocator kept.
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of glibc's own arenas; it has no
    // preconditions and does not touch live allocations.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sends `signal` to `pid`; Err when it failed (e.g. the process is gone).
pub fn signal(pid: u32, signal: Signal) -> Result<(), String> {
    nix::sys::signal::kill(Pid::from_raw(pid as i32), signal)
        .map_err(|e| format!("kill({pid}, {signal}): {e}"))
}

/// Kills and reaps `pid` (one of our children), waiting at most about a second.
fn kill_and_reap(pid: i32) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match nix::sys::wait::waitpid(
            Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                std::thread::sleep(Duration::from_millis(1))
            }
            _ => return,
        }
    }
}

/// What the leak checks compare.
pub struct Snapshot {
    children: BTreeMap<i32, (String, char)>,
    fds: BTreeMap<i32, String>,
}

impl Snapshot {
    /// Our children and open fds now.
    pub fn take() -> Snapshot {
        Snapshot {
            children: children(),
            fds: open_fds(),
        }
    }

    /// Number of open fds.
    pub fn fd_count(&self) -> usize {
        self.fds.len()
    }

    /// Children (with zombies marked) and fds present now but not in `before`, and fds of
    /// `before` that are gone.
    pub fn leaks_since(&self, before: &Snapshot) -> Vec<String> {
        let mut leaks = Vec::new();
        for (pid, (comm, state)) in &self.children {
            if !before.children.contains_key(pid) {
                let kind = if *state == 'Z' { "zombie" } else { "process" };
                leaks.push(format!("{kind} {pid} ({comm})"));
            }
        }
        for (fd, target) in &self.fds {
            if before.fds.get(fd) != Some(target) {
                leaks.push(format!("fd {fd} -> {target}"));
            }
        }
        for (fd, target) in &before.fds {
            if !self.fds.contains_key(fd) {
                leaks.push(format!("fd {fd} -> {target} closed by someone else"));
            }
        }
        leaks
    }

    /// New children now, and how many of them are zombies.
    pub fn new_children(&self, before: &Snapshot) -> (usize, usize) {
        let new: Vec<char> = self
            .children
            .iter()
            .filter(|(pid, _)| !before.children.contains_key(pid))
            .map(|(_, (_, state))| *state)
            .collect();
        let zombies = new.iter().filter(|s| **s == 'Z').count();
        (new.len(), zombies)
    }
}

/// Entries of the temp base directory.
pub fn temp_entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path().display().to_string())
            .collect(),
        Err(e) => vec![format!("{}: {e}", dir.display())],
    }
}

/// Waits up to `settle` for the process to be back to `before` (a thread may still be closing
/// an fd), then returns what leaked and cleans it up: new children are killed and reaped,
/// temp entries removed.
pub fn settle_leaks(before: &Snapshot, temp_base: &Path, settle: Duration) -> Vec<String> {
    let until = Instant::now() + settle;
    loop {
        let now = Snapshot::take();
        let mut leaks = now.leaks_since(before);
        leaks.extend(
            temp_entries(temp_base)
                .into_iter()
                .map(|e| format!("temp entry {e}")),
        );
        if leaks.is_empty() || Instant::now() >= until {
            if !leaks.is_empty() {
                for pid in now.children.keys() {
                    if !before.children.contains_key(pid) {
                        kill_and_reap(*pid);
                    }
                }
                super::empty_dir(temp_base);
            }
            return leaks;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits up to `timeout` for a new child of ours (not in `known`) whose comm starts with
/// `comm_prefix`, i.e. one that has exec'd that program; returns its pid.
pub fn wait_new_child(
    known: &BTreeMap<i32, (String, char)>,
    comm_prefix: &str,
    timeout: Duration,
) -> Option<u32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for (pid, (comm, _)) in children() {
            if !known.contains_key(&pid) && comm.starts_with(comm_prefix) {
                return Some(pid as u32);
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// Snapshot of our children only (for [`wait_new_child`]).
pub fn known_children() -> BTreeMap<i32, (String, char)> {
    children()
}
