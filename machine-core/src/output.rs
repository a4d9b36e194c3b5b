//! Draining QEMU's stdout and stderr: one pipe, read continuously by a thread into the log
//! file and a bounded in-memory tail, so QEMU never blocks on a full pipe.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

const PIPE: Token = Token(0);
const WAKE: Token = Token(1);

/// The bounded buffer of QEMU's output.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    bytes: VecDeque<u8>,
    capacity: usize,
    total: u64,
}

impl Tail {
    pub(crate) fn new(capacity: usize) -> Self {
        Tail {
            bytes: VecDeque::new(),
            capacity,
            total: 0,
        }
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        if self.capacity == 0 {
            return;
        }
        let chunk = if chunk.len() > self.capacity {
            &chunk[chunk.len() - self.capacity..]
        } else {
            chunk
        };
        let overflow = (self.bytes.len() + chunk.len()).saturating_sub(self.capacity);
        self.bytes.drain(..overflow);
        self.bytes.extend(chunk);
    }

    /// The last `max` bytes (all of them when `max` is larger).
    pub(crate) fn last_bytes(&self, max: usize) -> Vec<u8> {
        let skip = self.bytes.len().saturating_sub(max);
        self.bytes.iter().skip(skip).copied().collect()
    }

    /// Everything held, as text (invalid UTF-8 replaced, never an error).
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.last_bytes(usize::MAX)).into_owned()
    }

    /// Bytes seen in total, including those that fell out of the buffer.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Bytes that no longer fit.
    pub(crate) fn dropped(&self) -> u64 {
        self.total - self.bytes.len() as u64
    }
}

/// The last `n` lines of `text` (a trailing partial line counts as a line).
pub(crate) fn last_lines(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    lines[skip..].iter().map(|l| (*l).to_owned()).collect()
}

/// The running drain of QEMU's stdout/stderr pipe: a thread that owns the read end, or
/// (stepped) the read end itself, read by an owner's poll through [`OutputDrain::pump`].
pub(crate) struct OutputDrain {
    tail: Arc<Mutex<Tail>>,
    mode: Mode,
}

enum Mode {
    Thread {
        waker: Waker,
        done: mpsc::Receiver<()>,
        handle: Option<thread::JoinHandle<()>>,
    },
    Stepped(Pipe),
}

/// The read end and where its bytes go (besides the tail).
struct Pipe {
    file: File,
    log: Option<File>,
    eof: bool,
}

/// Bytes [`Pipe::read`] takes per call at most, so a flooding QEMU cannot hold a thread that
/// drives many machines.
const READ_BUDGET: usize = 256 * 1024;

impl Pipe {
    /// Reads until `WouldBlock`, end-of-file or `budget` bytes; true if it stopped at the
    /// budget (call again: no readiness event may announce the rest).
    fn read(&mut self, buf: &mut [u8], tail: &Mutex<Tail>, budget: usize) -> bool {
        let mut taken = 0;
        while !self.eof {
            if taken >= budget {
                return true;
            }
            match self.file.read(buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    taken += n;
                    let chunk = &buf[..n];
                    log::trace!("qemu output: {} bytes", n);
                    if let Some(file) = self.log.as_mut() {
                        if let Err(err) = file.write_all(chunk) {
                            // Keep draining: a full disk must not block QEMU.
                            log::warn!("cannot write qemu log file: {err}; logging to it stops");
                            self.log = None;
                        }
                    }
                    lock(tail).push(chunk);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    log::warn!("qemu output drain: read failed: {err}");
                    self.eof = true;
                }
            }
        }
        false
    }
}

fn lock(tail: &Mutex<Tail>) -> MutexGuard<'_, Tail> {
    // A panic while holding the lock cannot leave a Tail inconsistent in a way that matters
    // for reading text out of it.
    tail.lock().unwrap_or_else(PoisonError::into_inner)
}

impl OutputDrain {
    /// Starts draining `pipe` into `log` (if any) and a tail of `capacity` bytes.
    pub(crate) fn start(
        pipe: OwnedFd,
        log: Option<File>,
        capacity: usize,
        name: &str,
    ) -> io::Result<OutputDrain> {
        let pipe = File::from(pipe);
        crate::sys::set_nonblocking(pipe.as_fd())?;
        let poll = Poll::new()?;
        poll.registry().register(
            &mut SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&pipe)),
            PIPE,
            Interest::READABLE,
        )?;
        let waker = Waker::new(poll.registry(), WAKE)?;
        let tail = Arc::new(Mutex::new(Tail::new(capacity)));
        let (done_tx, done) = mpsc::channel();
        let thread_tail = Arc::clone(&tail);
        let mut pipe = Pipe {
            file: pipe,
            log,
            eof: false,
        };
        let handle = thread::Builder::new()
            .name(format!("{name}-output"))
            .spawn(move || {
                drain_loop(poll, &mut pipe, &thread_tail);
                let _ = done_tx.send(());
            })?;
        Ok(OutputDrain {
            tail,
            mode: Mode::Thread {
                waker,
                done,
                handle: Some(handle),
            },
        })
    }

    /// A drain without a thread: the owner registers [`OutputDrain::stepped_fd`] in its poll
    /// (readable, edge-triggered) and calls [`OutputDrain::pump`] on readiness.
    pub(crate) fn stepped(
        pipe: OwnedFd,
        log: Option<File>,
        capacity: usize,
    ) -> io::Result<OutputDrain> {
        let file = File::from(pipe);
        crate::sys::set_nonblocking(file.as_fd())?;
        Ok(OutputDrain {
            tail: Arc::new(Mutex::new(Tail::new(capacity))),
            mode: Mode::Stepped(Pipe {
                file,
                log,
                eof: false,
            }),
        })
    }

    /// The pipe of a stepped drain, for the owner's poll.
    pub(crate) fn stepped_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match &self.mode {
            Mode::Stepped(pipe) => Some(std::os::fd::AsFd::as_fd(&pipe.file)),
            Mode::Thread { .. } => None,
        }
    }

    /// Reads what a stepped drain's pipe holds, up to a budget; true if input may be left
    /// (call again without waiting for readiness). Nothing to do for a thread drain.
    pub(crate) fn pump(&mut self) -> bool {
        match &mut self.mode {
            Mode::Stepped(pipe) => {
                let mut buf = [0u8; 16 * 1024];
                pipe.read(&mut buf, &self.tail, READ_BUDGET)
            }
            Mode::Thread { .. } => false,
        }
    }

    /// Runs `f` on the tail as it is right now.
    pub(crate) fn with_tail<R>(&self, f: impl FnOnce(&Tail) -> R) -> R {
        f(&lock(&self.tail))
    }

    /// Waits up to `grace` for end-of-file (all writers gone), then stops the thread after a
    /// last non-blocking read, and returns the tail.
    pub(crate) fn finish(mut self, grace: Duration) -> Tail {
        match &mut self.mode {
            Mode::Thread {
                waker,
                done,
                handle,
            } => {
                if done.recv_timeout(grace).is_err() {
                    // Something still holds the write end (e.g. a grandchild of QEMU): stop
                    // anyway.
                    let _ = waker.wake();
                }
                if let Some(handle) = handle.take() {
                    let _ = handle.join();
                }
            }
            Mode::Stepped(pipe) => {
                let deadline = std::time::Instant::now() + grace;
                let mut buf = vec![0u8; 64 * 1024];
                while !pipe.eof {
                    if pipe.read(&mut buf, &self.tail, usize::MAX) {
                        continue;
                    }
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    let readable =
                        crate::process::poll_readable(std::os::fd::AsFd::as_fd(&pipe.file), left)
                            .unwrap_or(false);
                    if !readable {
                        break;
                    }
                }
            }
        }
        std::mem::take(&mut *lock(&self.tail))
    }
}

impl Drop for OutputDrain {
    fn drop(&mut self) {
        if let Mode::Thread { waker, handle, .. } = &mut self.mode {
            if let Some(handle) = handle.take() {
                let _ = waker.wake();
                let _ = handle.join();
            }
        }
    }
}

fn drain_loop(mut poll: Poll, pipe: &mut Pipe, tail: &Mutex<Tail>) {
    let mut events = Events::with_capacity(4);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Err(err) = poll.poll(&mut events, None) {
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::warn!("qemu output drain: poll failed: {err}");
            return;
        }
        let stop = events.iter().any(|e| e.token() == WAKE);
        // Read until WouldBlock (edge-triggered readiness) or EOF.
        pipe.read(&mut buf, tail, usize::MAX);
        if stop || pipe.eof {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_bytes_and_counts_the_rest() {
        let mut tail = Tail::new(8);
        tail.push(b"hello ");
        tail.push(b"world");
        assert_eq!(tail.last_bytes(usize::MAX), b"lo world");
        assert_eq!(tail.total(), 11);
        assert_eq!(tail.dropped(), 3);
        tail.push(b"0123456789abcdef");
        assert_eq!(tail.last_bytes(100), b"89abcdef");
        assert_eq!(tail.last_bytes(3), b"def");
        assert_eq!(tail.dropped(), 27 - 8);
    }

    #[test]
    fn tail_text_is_lossy_never_an_error() {
        let mut tail = Tail::new(64);
        tail.push(b"ok \xff\xfe done\n");
        assert_eq!(tail.text(), "ok \u{fffd}\u{fffd} done\n");
    }

    #[test]
    fn last_lines_takes_from_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), vec!["b", "c"]);
        assert_eq!(last_lines("a\nb\npartial", 2), vec!["b", "partial"]);
        assert!(last_lines("", 3).is_empty());
    }

    #[test]
    fn drain_copies_to_log_and_tail_and_ends_at_eof() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("q.log");
        let log = File::create(&log_path).expect("log");
        let drain = OutputDrain::start(r, Some(log), 4, "test").expect("start");
        let mut w = File::from(w);
        w.write_all(b"abcdef").expect("write");
        drop(w);
        let tail = drain.finish(Duration::from_secs(10));
        assert_eq!(tail.last_bytes(usize::MAX), b"cdef");
        assert_eq!(tail.total(), 6);
        assert_eq!(std::fs::read(&log_path).expect("read log"), b"abcdef");
    }

    #[test]
    fn finish_stops_even_if_a_writer_remains() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let drain = OutputDrain::start(r, None, 1024, "test").expect("start");
        let mut w = File::from(w);
        w.write_all(b"still open").expect("write");
        let started = std::time::Instant::now();
        let tail = drain.finish(Duration::from_millis(50));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(tail.last_bytes(usize::MAX), b"still open");
    }
}
