//! The console handle: reads, waits and sends, while a background thread (or an owner's
//! [`Drainer`](crate::Drainer)) keeps draining the socket.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use crate::config::{Config, LineEnding};
use crate::core::{check_socket_path, Shared};
use crate::drainer::{DrainStatus, Drainer};
use crate::error::{CloseReason, Error, Result};
use crate::pattern::{AnyMatch, Match, Outcome, Pattern};

/// A serial console attached to a stream socket, drained from the moment it exists.
///
/// Output is read continuously (by a background thread for consoles made with
/// [`from_unix_stream`](Console::from_unix_stream), [`from_fd`](Console::from_fd) or
/// [`connect`](Console::connect); by the owner's poll loop for a [`Drainer`]'s console) into the
/// optional log file and a bounded in-memory buffer. The drainer can move between the two at
/// any time without losing a byte: [`take_drainer`](Console::take_drainer) stops the thread and
/// hands it to the owner's poll, [`drain_on_thread`](Console::drain_on_thread) gives it a thread
/// again. The reading methods work on that buffer:
///
/// - Output is **consumed** by [`read_available`](Console::read_available),
///   [`read_line`](Console::read_line) and by successful waits, which consume everything up to
///   the end of their match. The next call starts right after: consecutive waits see
///   consecutive output, and output that arrived before a wait is seen by it.
/// - When the stream ends, every wait returns [`Error::Closed`] at once (after checking the
///   output that arrived before the end), carrying the unconsumed output.
/// - A timeout ([`Error::Timeout`]) consumes nothing.
/// - If the caller falls more than [`Config::buffer_capacity`] behind, the oldest unconsumed
///   output is dropped from memory (counted by [`bytes_dropped`](Console::bytes_dropped)); the
///   log file still gets it.
///
/// [`close`](Console::close) (or drop) shuts the socket down, joins the drain thread and
/// flushes the log.
pub struct Console {
    shared: Arc<Shared>,
    writer: UnixStream,
    /// One send at a time, so sends from several threads never interleave on the wire.
    sending: SendTurn,
    thread: Option<DrainThread>,
    line_ending: LineEnding,
    send_timeout: Duration,
    regex_lookback: usize,
    closed: bool,
}

/// The background drain of a thread-mode console.
struct DrainThread {
    /// Gives the drainer (and its poll) back when it ends.
    handle: JoinHandle<(Drainer, Poll)>,
    /// Wakes the thread's poll so it stops even if the socket shutdown did not reach it.
    waker: mio::Waker,
    /// Set before a wake that asks for the drainer ([`Console::take_drainer`]) rather than
    /// for the end of the drain ([`Console::close`]).
    handover: Arc<AtomicBool>,
}

const DRAIN_TOKEN: Token = Token(0);
const STOP_TOKEN: Token = Token(1);

impl Console {
    pub(crate) fn new(shared: Arc<Shared>, writer: UnixStream, config: &Config) -> Console {
        Console {
            shared,
            writer,
            sending: SendTurn::default(),
            thread: None,
            line_ending: config.line_ending,
            send_timeout: config.send_timeout,
            regex_lookback: config.regex_lookback,
            closed: false,
        }
    }

    /// Attaches to a connected stream socket and starts draining it on a background thread.
    ///
    /// This is the default for QEMU: machine-core creates a socketpair, hands one end to QEMU
    /// (`-chardev socket,id=con,fd=N`) and gives the other end here.
    pub fn from_unix_stream(stream: UnixStream, config: Config) -> Result<Console> {
        let (drainer, mut console) = Drainer::from_unix_stream(stream, config)?;
        console.drain_on_thread(drainer)?;
        Ok(console)
    }

    /// Stops the background drain thread and hands its [`Drainer`] over, for the caller's own
    /// poll to drive (see [`Drainer`] for the contract: register it, call
    /// [`Drainer::drain`] on readiness and once right away). Nothing is lost: output the
    /// thread read is in the buffer, output it did not read is still in the socket. From now
    /// on waits on this console block until the caller's poll delivers output, so the thread
    /// driving that poll must wait with a zero timeout.
    ///
    /// Fails with [`Error::DrainerHandover`] when there is no thread to take it from (the
    /// console is closed, or its drainer is already with a poll).
    pub fn take_drainer(&mut self) -> Result<Drainer> {
        if self.closed {
            return Err(Error::DrainerHandover {
                reason: "the console is closed",
            });
        }
        let Some(thread) = self.thread.take() else {
            return Err(Error::DrainerHandover {
                reason: "no drain thread runs (the drainer is already driven by a poll)",
            });
        };
        thread.handover.store(true, Ordering::SeqCst);
        if let Err(e) = thread.waker.wake() {
            log::warn!("console drain waker: {e}");
        }
        let (drainer, poll) = thread
            .handle
            .join()
            .map_err(|_| Error::DrainThreadPanicked)?;
        // The thread's poll goes; the drainer's socket leaves it first.
        let mut drainer = drainer;
        if let Err(e) = poll.registry().deregister(&mut drainer) {
            log::debug!("console drain poll deregister: {e}");
        }
        Ok(drainer)
    }

    /// Starts a background thread that drives `drainer` (this console's own, as made with it
    /// by [`Drainer::from_unix_stream`] or given back by [`Console::take_drainer`]), so waits
    /// work from any thread again. Deregister it from any poll of yours first.
    ///
    /// Fails with [`Error::DrainerHandover`] when `drainer` belongs to another console, a
    /// thread already drains this one or the console is closed, and with [`Error::Setup`] when
    /// the thread cannot start; the drainer is dropped then (this console's waits end with
    /// [`Error::Closed`]).
    pub fn drain_on_thread(&mut self, mut drainer: Drainer) -> Result<()> {
        let reason = if !drainer.feeds(&self.shared) {
            Some("the drainer belongs to another console")
        } else if self.thread.is_some() {
            Some("a drain thread already runs")
        } else if self.closed {
            Some("the console is closed")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(Error::DrainerHandover { reason });
        }
        let poll = Poll::new().map_err(|source| Error::Setup {
            what: "create the drain poller",
            source,
        })?;
        poll.registry()
            .register(&mut drainer, DRAIN_TOKEN, Interest::READABLE)
            .map_err(|source| Error::Setup {
                what: "register the socket with the drain poller",
                source,
            })?;
        let waker =
            mio::Waker::new(poll.registry(), STOP_TOKEN).map_err(|source| Error::Setup {
                what: "create the drain thread's waker",
                source,
            })?;
        let handover = Arc::new(AtomicBool::new(false));
        let asked = Arc::clone(&handover);
        let handle = std::thread::Builder::new()
            .name("console-drain".into())
            .spawn(move || run_drain_thread(drainer, poll, &asked))
            .map_err(|source| Error::Setup {
                what: "spawn the drain thread",
                source,
            })?;
        self.thread = Some(DrainThread {
            handle,
            waker,
            handover,
        });
        Ok(())
    }

    /// Attaches to a connected stream socket given as an owned fd (see
    /// [`from_unix_stream`](Console::from_unix_stream)).
    pub fn from_fd(fd: OwnedFd, config: Config) -> Result<Console> {
        Console::from_unix_stream(UnixStream::from(fd), config)
    }

    /// Connects to a unix socket path where QEMU listens (`-chardev
    /// socket,path=P,server=on,wait=off`) and starts draining.
    ///
    /// A missing path, a refused connection or a full backlog is retried until
    /// [`Config::connect_timeout`] (QEMU may not have created the socket yet, or may be busy),
    /// then [`Error::ConnectTimeout`]. Paths over 107 bytes fail at once with
    /// [`Error::PathTooLong`].
    pub fn connect(path: &Path, config: Config) -> Result<Console> {
        let stream = connect_unix(path, config.connect_timeout)?;
        Console::from_unix_stream(stream, config)
    }

    /// Takes all unconsumed output (possibly none) without waiting.
    pub fn read_available(&mut self) -> Vec<u8> {
        self.shared.take_unconsumed()
    }

    /// Waits for a complete line and consumes it; returns it without its `\n` (or `\r\n`).
    pub fn read_line(&mut self, timeout: Duration) -> Result<Vec<u8>> {
        let hit = self.shared.wait(
            timeout,
            0,
            || "a line".to_string(),
            |hay, from| {
                let at = from + hay[from..].iter().position(|&b| b == b'\n')?;
                Some((at..at + 1, ()))
            },
        )?;
        let mut line = hit.text;
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(line)
    }

    /// Waits until `pattern` appears in the output, then consumes everything up to the end of
    /// the match. A [`Duration::ZERO`] timeout checks once without waiting.
    pub fn wait_for(&mut self, pattern: &Pattern, timeout: Duration) -> Result<Match> {
        let hit = self.shared.wait(
            timeout,
            pattern.overlap(self.regex_lookback),
            || pattern.to_string(),
            |hay, from| pattern.find_at(hay, from).map(|r| (r, ())),
        )?;
        Ok(Match::new(hit.text, hit.range, hit.stream_start))
    }

    /// Waits until any success or failure pattern appears; reports which one matched.
    ///
    /// The match that ends first in the output wins; on a tie a failure pattern beats a
    /// success pattern, and a lower index beats a higher one. A failure match is an `Ok`
    /// result with [`Outcome::Failure`]: the caller decides what it means.
    pub fn wait_for_any(
        &mut self,
        success: &[Pattern],
        failure: &[Pattern],
        timeout: Duration,
    ) -> Result<AnyMatch> {
        let lookback = self.regex_lookback;
        let overlap = success
            .iter()
            .chain(failure)
            .map(|p| p.overlap(lookback))
            .max()
            .unwrap_or(0);
        let candidates = || {
            failure
                .iter()
                .enumerate()
                .map(|(i, p)| (Outcome::Failure, i, p))
                .chain(
                    success
                        .iter()
                        .enumerate()
                        .map(|(i, p)| (Outcome::Success, i, p)),
                )
        };
        let describe = || {
            let list = |ps: &[Pattern]| {
                ps.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!("any of [{}] (failure: [{}])", list(success), list(failure))
        };
        let hit = self.shared.wait(timeout, overlap, describe, |hay, from| {
            let mut best: Option<(std::ops::Range<usize>, (Outcome, usize))> = None;
            for (outcome, index, pattern) in candidates() {
                if let Some(range) = pattern.find_at(hay, from) {
                    if best.as_ref().is_none_or(|(b, _)| range.end < b.end) {
                        best = Some((range, (outcome, index)));
                    }
                }
            }
            best
        })?;
        let (outcome, index) = hit.payload;
        Ok(AnyMatch {
            outcome,
            index,
            found: Match::new(hit.text, hit.range, hit.stream_start),
        })
    }

    /// The last `n` bytes of output still in memory, consumed or not (consumes nothing).
    pub fn tail(&self, n: usize) -> Vec<u8> {
        self.shared.tail(n)
    }

    /// Sends bytes to the console (within [`Config::send_timeout`]).
    ///
    /// Sends from several threads go out one after the other, each whole: a send waits (within
    /// its own timeout) while another is still writing. [`Error::BrokenPipe`] when the peer has
    /// gone; never raises `SIGPIPE`.
    pub fn send(&self, data: &[u8]) -> Result<()> {
        let deadline = deadline_after(self.send_timeout);
        self.send_until(data, deadline, self.send_timeout)
    }

    /// Sends `line` followed by the configured [`LineEnding`], in one write.
    pub fn send_line(&self, line: &str) -> Result<()> {
        let deadline = deadline_after(self.send_timeout);
        self.send_until(&self.line_bytes(line), deadline, self.send_timeout)
    }

    /// Sends `command` as a line, then waits for `pattern`; `timeout` covers both.
    ///
    /// Output already pending is not discarded: the wait sees it (and the command's echo).
    pub fn exec_and_wait(
        &mut self,
        command: &str,
        pattern: &Pattern,
        timeout: Duration,
    ) -> Result<Match> {
        let left = self.send_command(command, timeout)?;
        self.wait_for(pattern, left)
    }

    /// Sends `command` as a line, then waits for any of `success` or `failure`; `timeout`
    /// covers both. QEMU's functional-test `exec_command_and_wait_for_pattern` with its
    /// failure message; a failure match is an `Ok` with [`Outcome::Failure`](crate::Outcome)
    /// (see [`Console::wait_for_any`]).
    pub fn exec_and_wait_any(
        &mut self,
        command: &str,
        success: &[Pattern],
        failure: &[Pattern],
        timeout: Duration,
    ) -> Result<AnyMatch> {
        let left = self.send_command(command, timeout)?;
        self.wait_for_any(success, failure, left)
    }

    /// Sends `command` as a line within `timeout` (and the send timeout); returns the time
    /// left of `timeout` for the wait that follows.
    fn send_command(&self, command: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let send_timeout = timeout.min(self.send_timeout);
        self.send_until(
            &self.line_bytes(command),
            deadline_after(send_timeout),
            send_timeout,
        )?;
        Ok(timeout.saturating_sub(start.elapsed()))
    }

    /// Sends `interrupt` (for example `"\r"` or Ctrl-C, `"\x03"`) again every `interval`
    /// until any of `success` or `failure` appears, within `timeout` in all. QEMU's
    /// functional-test `interrupt_interactive_console_until_pattern` (which re-sends after
    /// every line instead of on a timer). [`Error::Timeout`] names the total wait.
    pub fn interrupt_until(
        &mut self,
        interrupt: &[u8],
        success: &[Pattern],
        failure: &[Pattern],
        interval: Duration,
        timeout: Duration,
    ) -> Result<AnyMatch> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let send_timeout = left.min(self.send_timeout);
            self.send_until(interrupt, deadline_after(send_timeout), send_timeout)?;
            let left = deadline.saturating_duration_since(Instant::now());
            match self.wait_for_any(success, failure, interval.min(left)) {
                Err(Error::Timeout {
                    waiting_for,
                    recent,
                    ..
                }) if Instant::now() >= deadline => {
                    return Err(Error::Timeout {
                        waiting_for,
                        timeout,
                        recent,
                    })
                }
                Err(Error::Timeout { .. }) => {}
                other => return other,
            }
        }
    }

    /// Bytes read from the socket since creation (all of them reached the log file).
    pub fn bytes_total(&self) -> u64 {
        self.shared.bytes_total()
    }

    /// Unconsumed bytes evicted from memory because the caller fell more than
    /// [`Config::buffer_capacity`] behind.
    pub fn bytes_dropped(&self) -> u64 {
        self.shared.bytes_dropped()
    }

    /// Bytes currently held in memory (consumed history included); never more than
    /// [`Config::buffer_capacity`].
    pub fn buffer_len(&self) -> usize {
        self.shared.buffer_len()
    }

    /// Bytes in memory not yet consumed.
    pub fn unconsumed_len(&self) -> usize {
        self.shared.unconsumed_len()
    }

    /// True once the stream ended (the peer closed, reset, or we closed).
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// The log file, if one is configured.
    pub fn log_path(&self) -> Option<PathBuf> {
        self.shared.log_path()
    }

    /// Closes the console: shuts the socket down (the drain reads what was already queued,
    /// then stops), joins the drain thread and flushes and closes the log.
    ///
    /// Idempotent: later calls return `Ok(())`. Reports the first log write error
    /// ([`Error::LogWrite`]). For a [`Drainer`]'s console the drainer's owner keeps the log
    /// open until the drainer sees the end; close flushes what is there.
    pub fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.shared.finish(CloseReason::Local);
        if let Err(e) = self.writer.shutdown(Shutdown::Both) {
            // ENOTCONN: the peer is already gone, which is what we want.
            if e.kind() != io::ErrorKind::NotConnected {
                log::debug!("console shutdown: {e}");
            }
        }
        let joined = match self.thread.take() {
            None => Ok(()),
            Some(thread) => {
                if let Err(e) = thread.waker.wake() {
                    // The shutdown above still ends the drain with an EOF.
                    log::debug!("console drain waker: {e}");
                }
                // Dropping the drainer ends the drain for good (and flushes the log).
                thread
                    .handle
                    .join()
                    .map(drop)
                    .map_err(|_| Error::DrainThreadPanicked)
            }
        };
        let logged = self.shared.close_log(self.nobody_else_drains());
        joined.and(logged)
    }

    /// Whether the drain is over for good, so the log can be closed (a thread-mode console
    /// after the join, or a drainer-mode console whose drainer was dropped).
    fn nobody_else_drains(&self) -> bool {
        // After a join the drain thread is gone; a Drainer's owner may still be draining.
        Arc::strong_count(&self.shared) == 1
    }

    fn line_bytes(&self, line: &str) -> Vec<u8> {
        let ending = self.line_ending.as_bytes();
        let mut bytes = Vec::with_capacity(line.len() + ending.len());
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(ending);
        bytes
    }

    fn send_until(&self, data: &[u8], deadline: Instant, timeout: Duration) -> Result<()> {
        if self.closed {
            return Err(Error::Closed {
                unconsumed: Vec::new(),
                reason: CloseReason::Local,
            });
        }
        let Some(_turn) = self.sending.acquire(deadline) else {
            return Err(Error::SendTimeout {
                written: 0,
                len: data.len(),
                timeout,
            });
        };
        crate::sys::send_all(self.writer.as_fd(), data, deadline, timeout)
    }
}

/// Turns at the socket for sending threads: a partial write of one send must not be followed
/// by bytes of another. Waiting for a turn respects the sender's own deadline.
#[derive(Default)]
struct SendTurn {
    busy: Mutex<bool>,
    free: Condvar,
}

/// A sender's turn; the next sender may go when it is dropped.
struct Turn<'a>(&'a SendTurn);

impl SendTurn {
    fn lock(&self) -> MutexGuard<'_, bool> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until no other send runs, or `None` once `deadline` passes.
    fn acquire(&self, deadline: Instant) -> Option<Turn<'_>> {
        let mut busy = self.lock();
        while *busy {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            busy = self
                .free
                .wait_timeout(busy, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *busy = true;
        Some(Turn(self))
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *self.0.lock() = false;
        self.0.free.notify_one();
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::warn!("closing console on drop: {e}");
        }
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("log_path", &self.log_path())
            .field("bytes_total", &self.bytes_total())
            .field("bytes_dropped", &self.bytes_dropped())
            .field("closed", &self.is_closed())
            .field("drain_thread", &self.thread.is_some())
            .finish_non_exhaustive()
    }
}

/// `now + timeout`, saturating far in the future for absurd timeouts.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// The drain thread: a [`Drainer`] on a private poll, woken by readiness, a due log flush, or
/// [`Console::close`] (which also shuts the socket down, so queued output is still drained)
/// or [`Console::take_drainer`] (`handover` set). Returns the drainer and its poll: ended
/// (closed, or failed) unless handed over.
fn run_drain_thread(
    mut drainer: Drainer,
    mut poll: Poll,
    handover: &AtomicBool,
) -> (Drainer, Poll) {
    let mut events = Events::with_capacity(4);
    // Drain first: output may have arrived before registration.
    loop {
        if events.iter().any(|e| e.token() == STOP_TOKEN) && handover.load(Ordering::SeqCst) {
            // The caller's poll drains from here on; nothing read is lost.
            break;
        }
        match drainer.drain() {
            DrainStatus::Closed => break,
            // Input is left that no event may announce, and this thread drains nothing else.
            DrainStatus::More => continue,
            DrainStatus::Open => {}
        }
        if events.iter().any(|e| e.token() == STOP_TOKEN) {
            // Close asked us to stop; what was queued has just been drained.
            drainer.fail(CloseReason::Local);
            break;
        }
        let timeout = drainer
            .next_flush()
            .map(|due| due.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                log::warn!("console drain poll failed, draining stops: {e}");
                drainer.fail(CloseReason::ReadFailed(e.kind()));
                break;
            }
        }
    }
    (drainer, poll)
}

/// Connects to `path`, retrying while it is missing, refuses connections or has a full
/// backlog.
pub(crate) fn connect_unix(path: &Path, timeout: Duration) -> Result<UnixStream> {
    check_socket_path(path)?;
    let deadline = deadline_after(timeout);
    let mut backoff = Duration::from_millis(1);
    loop {
        // Nonblocking: a full backlog must not put us to sleep past the deadline.
        match crate::sys::connect_unix_nonblocking(path) {
            Ok(stream) => {
                log::info!("console connected to {}", path.display());
                return Ok(stream);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound
                        | io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::WouldBlock
                ) =>
            {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::ConnectTimeout {
                        path: path.to_path_buf(),
                        timeout,
                        source: e,
                    });
                }
                // Retry back-off while QEMU creates or starts listening on the socket.
                std::thread::sleep(backoff.min(deadline - now));
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(Error::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// machine-core moves consoles and drainers between threads.
    #[test]
    fn console_and_drainer_are_send_and_console_is_sync() {
        fn send<T: Send>() {}
        fn sync<T: Sync>() {}
        send::<super::Console>();
        sync::<super::Console>();
        send::<super::Drainer>();
    }
}
