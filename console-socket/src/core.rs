//! The drain core shared by the background thread and the poll-driven [`Drainer`]: the bounded
//! buffer, the log writer and the wait engine. There is one implementation; the two drivers only
//! differ in who calls [`Shared::ingest`].
//!
//! [`Drainer`]: crate::Drainer

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufWriter, IoSliceMut, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{CloseReason, Error, Result};
use crate::ring::Ring;

/// Most bytes taken in by one read system call.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// Size of the log writer's buffer: a flush happens at least every this many bytes.
pub(crate) const LOG_BUFFER: usize = 64 * 1024;

/// At most this much unconsumed output rides along in a [`Error::Timeout`].
const RECENT_LIMIT: usize = 4096;

/// Bytes of already scanned output placed before a scan window so that look-behind
/// assertions (`^`, `\b`: at most one UTF-8 character back) see the real text.
const CONTEXT: u64 = 8;

/// State shared by the draining side and the [`Console`](crate::Console) handle.
pub(crate) struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    log: Mutex<Option<LogSink>>,
}

/// The bounded buffer and its bookkeeping, in absolute stream offsets (bytes since creation).
struct State {
    ring: Ring,
    /// Stream offset of the oldest byte in `ring`.
    base: u64,
    /// Stream offset of the first unconsumed byte; always within `base..=total`.
    consumed: u64,
    /// Unconsumed bytes evicted from memory.
    dropped: u64,
    closed: Option<CloseReason>,
}

impl State {
    fn total(&self) -> u64 {
        self.base + self.ring.len() as u64
    }

    /// Accounts for `n` new bytes written into the ring's spare room.
    fn commit(&mut self, n: usize) {
        self.base += self.ring.commit(n) as u64;
        if self.base > self.consumed {
            self.dropped += self.base - self.consumed;
            self.consumed = self.base;
        }
    }

    /// Stream bytes `from..to` (both within the buffer), borrowed when they do not straddle
    /// the ring's seam.
    fn slice(&self, from: u64, to: u64) -> Cow<'_, [u8]> {
        let (front, back) = self
            .ring
            .range((from - self.base) as usize, (to - self.base) as usize);
        if back.is_empty() {
            Cow::Borrowed(front)
        } else {
            Cow::Owned([front, back].concat())
        }
    }

    fn unconsumed_len(&self) -> usize {
        (self.total() - self.consumed) as usize
    }

    fn take_unconsumed(&mut self) -> Vec<u8> {
        let end = self.total();
        let out = self.slice(self.consumed, end).into_owned();
        self.consumed = end;
        out
    }

    fn recent(&self) -> Vec<u8> {
        let end = self.total();
        let from = end.saturating_sub(RECENT_LIMIT as u64).max(self.consumed);
        self.slice(from, end).into_owned()
    }
}

/// The optional log file behind a 64 KiB buffer, flushed by size, by age and at close.
struct LogSink {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    /// When the oldest unflushed byte was written; `None` when nothing is pending.
    pending_since: Option<Instant>,
    interval: Duration,
    /// The first write error; logging stops there and close reports it.
    error: Option<io::Error>,
}

impl LogSink {
    fn write(&mut self, chunk: &[u8]) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        if let Err(e) = out.write_all(chunk) {
            self.fail(e);
            return;
        }
        if out.buffer().is_empty() {
            self.pending_since = None;
        } else if self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
    }

    fn flush(&mut self) {
        if let Some(out) = self.out.as_mut() {
            if let Err(e) = out.flush() {
                self.fail(e);
            }
        }
        self.pending_since = None;
    }

    fn fail(&mut self, e: io::Error) {
        log::warn!(
            "console log {} stopped after a write error: {e}",
            self.path.display()
        );
        self.out = None;
        self.pending_since = None;
        self.error.get_or_insert(e);
    }

    fn due(&self) -> Option<Instant> {
        self.pending_since.map(|t| t + self.interval)
    }
}

/// What a successful wait consumed.
pub(crate) struct Hit<T> {
    /// The consumed output, ending with the match.
    pub(crate) text: Vec<u8>,
    /// The match's range in `text`.
    pub(crate) range: Range<usize>,
    /// Stream offset of `text[0]`.
    pub(crate) stream_start: u64,
    /// What the finder returned with the match.
    pub(crate) payload: T,
}

impl Shared {
    pub(crate) fn new(config: &Config) -> Result<Shared> {
        config.validate()?;
        let log = match &config.log_file {
            None => None,
            Some(path) => {
                let file = File::create(path).map_err(|source| Error::LogOpen {
                    path: path.clone(),
                    source,
                })?;
                Some(LogSink {
                    path: path.clone(),
                    out: Some(BufWriter::with_capacity(LOG_BUFFER, file)),
                    pending_since: None,
                    interval: config.flush_interval,
                    error: None,
                })
            }
        };
        Ok(Shared {
            state: Mutex::new(State {
                ring: Ring::new(config.buffer_capacity, READ_CHUNK),
                base: 0,
                consumed: 0,
                dropped: 0,
                closed: None,
            }),
            changed: Condvar::new(),
            log: Mutex::new(log),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log(&self) -> MutexGuard<'_, Option<LogSink>> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes in one read from the socket: `read` fills the buffer's free room directly (up to
    /// [`READ_CHUNK`] bytes, no intermediate copy); the bytes go to the log (which keeps
    /// everything), then become live in the bounded buffer, evicting the oldest. Returns what
    /// `read` returned. Waiters are woken by [`notify`](Shared::notify), which the drainer
    /// calls once per burst rather than once per chunk.
    pub(crate) fn ingest_from(
        &self,
        read: impl FnOnce(&mut [IoSliceMut<'_>]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut state = self.state();
        let n = read(&mut state.ring.spare())?;
        if n > 0 {
            log::trace!("console <-- {n} bytes");
            if let Some(sink) = self.log().as_mut() {
                let (a, b) = state.ring.fresh(n);
                sink.write(a);
                if !b.is_empty() {
                    sink.write(b);
                }
            }
            state.commit(n);
        }
        Ok(n)
    }

    /// Takes in `chunk` as if it had been read (tests feed the core this way).
    #[cfg(test)]
    pub(crate) fn ingest(&self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let n = self
                .ingest_from(|spare| {
                    let mut n = 0;
                    for slice in spare.iter_mut() {
                        let k = slice.len().min(chunk.len() - n);
                        slice[..k].copy_from_slice(&chunk[n..n + k]);
                        n += k;
                    }
                    Ok(n)
                })
                .unwrap_or(0);
            chunk = &chunk[n..];
        }
    }

    /// Wakes the waiters to look at new output.
    pub(crate) fn notify(&self) {
        self.changed.notify_all();
    }

    /// Records the end of the stream (the first reason wins), flushes the log, wakes waiters.
    pub(crate) fn finish(&self, reason: CloseReason) {
        {
            let mut state = self.state();
            if state.closed.is_none() {
                log::debug!("console closed: {reason}");
                state.closed = Some(reason);
            }
        }
        self.changed.notify_all();
        self.flush_log();
    }

    pub(crate) fn flush_log(&self) {
        if let Some(sink) = self.log().as_mut() {
            sink.flush();
        }
    }

    /// When the log next needs a flush, if anything is pending.
    pub(crate) fn flush_due(&self) -> Option<Instant> {
        self.log().as_ref().and_then(LogSink::due)
    }

    /// Flushes the log if its oldest pending byte is older than the flush interval.
    pub(crate) fn flush_log_if_due(&self, now: Instant) {
        if let Some(sink) = self.log().as_mut() {
            if sink.due().is_some_and(|due| due <= now) {
                sink.flush();
            }
        }
    }

    /// Flushes the log file, and closes it when `last` (nobody will write any more); returns
    /// its first write error, if any.
    pub(crate) fn close_log(&self, last: bool) -> Result<()> {
        let mut guard = self.log();
        let Some(sink) = guard.as_mut() else {
            return Ok(());
        };
        sink.flush();
        if last {
            sink.out = None;
        }
        match sink.error.take() {
            None => Ok(()),
            Some(source) => Err(Error::LogWrite {
                path: sink.path.clone(),
                source,
            }),
        }
    }

    pub(crate) fn log_path(&self) -> Option<PathBuf> {
        self.log().as_ref().map(|s| s.path.clone())
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state().closed.is_some()
    }

    pub(crate) fn bytes_total(&self) -> u64 {
        self.state().total()
    }

    pub(crate) fn bytes_dropped(&self) -> u64 {
        self.state().dropped
    }

    pub(crate) fn buffer_len(&self) -> usize {
        self.state().ring.len()
    }

    pub(crate) fn unconsumed_len(&self) -> usize {
        self.state().unconsumed_len()
    }

    pub(crate) fn take_unconsumed(&self) -> Vec<u8> {
        self.state().take_unconsumed()
    }

    pub(crate) fn tail(&self, n: usize) -> Vec<u8> {
        let state = self.state();
        let end = state.total();
        state
            .slice(end.saturating_sub(n as u64).max(state.base), end)
            .into_owned()
    }

    /// Waits until `find` matches in the unconsumed output, the stream ends, or `timeout`.
    ///
    /// `find(window, from)` gets a window of unconsumed output and the index in it where new
    /// output (minus `overlap` already scanned bytes) begins; the window starts a few bytes
    /// earlier ([`CONTEXT`]) or at the first unconsumed byte, whichever is later. It returns
    /// the range of its match in the window and a payload. On a hit everything up to the end
    /// of the match is consumed. `describe` names what was awaited, for the timeout error.
    pub(crate) fn wait<T>(
        &self,
        timeout: Duration,
        overlap: usize,
        describe: impl FnOnce() -> String,
        mut find: impl FnMut(&[u8], usize) -> Option<(Range<usize>, T)>,
    ) -> Result<Hit<T>> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.state();
        let mut scanned: Option<u64> = None;
        loop {
            let start = state.consumed;
            let end = state.total();
            let from = match scanned {
                None => start,
                Some(s) => s.saturating_sub(overlap as u64).max(start),
            };
            if scanned.is_none_or(|s| end > s) {
                // Only the window is scanned: new output, the overlap, a little context.
                let window_start = from.saturating_sub(CONTEXT).max(start);
                let window = state.slice(window_start, end);
                if let Some((range, payload)) = find(&window, (from - window_start) as usize) {
                    drop(window);
                    let match_start = window_start + range.start as u64;
                    let match_end = window_start + range.end as u64;
                    let text = state.slice(start, match_end).into_owned();
                    state.consumed = match_end;
                    return Ok(Hit {
                        text,
                        range: (match_start - start) as usize..(match_end - start) as usize,
                        stream_start: start,
                        payload,
                    });
                }
            }
            scanned = Some(end);
            if let Some(reason) = state.closed {
                return Err(Error::Closed {
                    unconsumed: state.take_unconsumed(),
                    reason,
                });
            }
            let now = Instant::now();
            let remaining = match deadline {
                Some(d) if d <= now => {
                    return Err(Error::Timeout {
                        waiting_for: describe(),
                        timeout,
                        recent: state.recent(),
                    })
                }
                Some(d) => d - now,
                // A timeout too large for an Instant: wait in long slices, effectively forever.
                None => Duration::from_secs(3600),
            };
            state = self
                .changed
                .wait_timeout(state, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Checks a unix socket path against the kernel's `sun_path` size (108 bytes with the NUL).
pub(crate) fn check_socket_path(path: &Path) -> Result<()> {
    const MAX: usize = 107;
    let len = path.as_os_str().len();
    if len > MAX {
        return Err(Error::PathTooLong {
            path: path.to_path_buf(),
            len,
            max: MAX,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(capacity: usize) -> Shared {
        // (Tests here call `ingest` directly; nobody waits concurrently, so no notify needed.)
        Shared::new(&Config::default().with_buffer_capacity(capacity)).unwrap()
    }

    #[test]
    fn buffer_evicts_oldest_and_counts_only_unconsumed_drops() {
        let s = shared(8);
        s.ingest(b"abcd");
        assert_eq!(s.take_unconsumed(), b"abcd");
        s.ingest(b"efgh");
        assert_eq!(s.buffer_len(), 8);
        assert_eq!(s.bytes_dropped(), 0);
        // Evicts the consumed "abcd" first: still nothing dropped.
        s.ingest(b"ijkl");
        assert_eq!(s.bytes_dropped(), 0);
        assert_eq!(s.tail(100), b"efghijkl");
        // Now unconsumed "efgh" goes.
        s.ingest(b"mnop");
        assert_eq!(s.bytes_dropped(), 4);
        assert_eq!(s.take_unconsumed(), b"ijklmnop");
        assert_eq!(s.bytes_total(), 16);
    }

    #[test]
    fn chunk_larger_than_capacity_keeps_its_tail() {
        let s = shared(4);
        s.ingest(b"xy");
        s.ingest(b"0123456789");
        assert_eq!(s.buffer_len(), 4);
        assert_eq!(s.bytes_dropped(), 8);
        assert_eq!(s.take_unconsumed(), b"6789");
        assert_eq!(s.bytes_total(), 12);
    }

    #[test]
    fn unconsumed_is_contiguous_across_the_ring_seam() {
        let s = shared(8);
        for chunk in [&b"abcdef"[..], b"ghij", b"kl"] {
            s.ingest(chunk);
        }
        assert_eq!(s.take_unconsumed(), b"efghijkl");
    }

    #[test]
    fn wait_rescans_only_new_output_plus_overlap() {
        let s = shared(64);
        s.ingest(b"0123456789");
        let mut froms = Vec::new();
        let r = s.wait(Duration::ZERO, 3, String::new, |hay, from| {
            froms.push((hay.len(), from));
            None::<(Range<usize>, ())>
        });
        assert!(matches!(r, Err(Error::Timeout { .. })));
        assert_eq!(froms, vec![(10, 0)]);
    }

    /// Feeds `noise + needle[..split]`, lets one wait scan it, then feeds the rest: that same
    /// wait call must find the needle across its two scans, and the second scan must cover
    /// only the new output plus the overlap (and a little context), not everything again.
    fn split_across_scans(pattern: &crate::Pattern, needle: &'static [u8], lookback: usize) {
        use std::sync::{mpsc, Arc};
        const NOISE: &[u8] = b"some noise that arrives before the pattern: ";
        for split in 0..=needle.len() {
            let s = Arc::new(shared(1024));
            s.ingest(NOISE);
            s.ingest(&needle[..split]);
            let (scanned_tx, scanned_rx) = mpsc::channel::<()>();
            let feeder = {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    scanned_rx.recv().unwrap();
                    s.ingest(&needle[split..]);
                    s.notify();
                })
            };
            let mut scans = Vec::new();
            let hit = s
                .wait(
                    Duration::from_secs(10),
                    pattern.overlap(lookback),
                    String::new,
                    |window, from| {
                        scans.push((window.len(), from));
                        let found = pattern.find_at(window, from);
                        scanned_tx.send(()).ok();
                        found.map(|r| (r, ()))
                    },
                )
                .unwrap();
            feeder.join().unwrap();
            assert_eq!(&hit.text[hit.range.clone()], needle, "split {split}");
            assert_eq!(
                hit.stream_start + hit.range.start as u64,
                NOISE.len() as u64
            );
            let first = NOISE.len() + split;
            assert_eq!(scans[0], (first, 0), "split {split}");
            if split < needle.len() {
                let window = CONTEXT as usize + pattern.overlap(lookback) + needle.len() - split;
                assert_eq!(scans.len(), 2, "split {split}");
                assert_eq!(
                    scans[1].0,
                    window.min(NOISE.len() + needle.len()),
                    "split {split}"
                );
            }
        }
    }

    #[test]
    fn substring_split_across_two_scans_of_one_wait_at_every_point() {
        split_across_scans(&crate::Pattern::substring("login: "), b"login: ", 4096);
    }

    #[test]
    fn regex_split_across_two_scans_of_one_wait_at_every_point() {
        let re = crate::Pattern::regex(r"Linux version \d+\.\d+ ").unwrap();
        split_across_scans(&re, b"Linux version 6.1 ", 20);
    }

    #[test]
    fn socket_path_limit_is_107_bytes() {
        let ok = "/".to_string() + &"a".repeat(106);
        assert!(check_socket_path(Path::new(&ok)).is_ok());
        let long = ok + "b";
        match check_socket_path(Path::new(&long)) {
            Err(Error::PathTooLong { len, max, .. }) => assert_eq!((len, max), (108, 107)),
            other => panic!("unexpected {other:?}"),
        }
    }
}
