//! `QtestProtocol`: the blocking qtest client with a deadline on every command and
//! asynchronous `IRQ` lines kept apart from replies.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use log::{debug, trace, warn};

use super::error::{Error, Result};
use super::wire::{self, Framed, Incoming, IrqEdge, IrqEvent, LineBuffer};

/// Settings of a [`QtestProtocol`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// Time allowed for each command, from sending it to its reply (default 30 s).
    pub command_timeout: Duration,
    /// How many `IRQ` events are queued before the oldest is dropped (default 4096). The
    /// level table ([`QtestProtocol::irq_level`]) is updated even for dropped events.
    pub irq_capacity: usize,
    /// Longest line accepted from QEMU, in bytes (default 4 MiB). `read`/`write` and their
    /// base64 forms split large transfers so that no line exceeds it.
    pub max_line: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            command_timeout: Duration::from_secs(30),
            irq_capacity: 4096,
            max_line: 4 << 20,
        }
    }
}

impl Config {
    /// Sets [`Config::command_timeout`].
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Sets [`Config::irq_capacity`] (at least 1).
    pub fn with_irq_capacity(mut self, capacity: usize) -> Self {
        self.irq_capacity = capacity.max(1);
        self
    }

    /// Sets [`Config::max_line`] (at least 64 bytes).
    pub fn with_max_line(mut self, bytes: usize) -> Self {
        self.max_line = bytes.max(64);
        self
    }
}

/// The byte order of the emulated target, as the `endianness` command reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endianness {
    /// `OK little`.
    Little,
    /// `OK big`.
    Big,
}

/// A client for QEMU's qtest line protocol.
///
/// # Protocol contract
///
/// - Every command is one line; QEMU answers each with exactly one line, `OK [words]`,
///   `FAIL [message]` or (for `write`/`b64write` with empty data) `ERR [message]`, in order.
///   `OK` gives the words after it; `FAIL`/`ERR` become [`Error::Failed`].
/// - After `irq_intercept_in`/`irq_intercept_out`, QEMU also writes `IRQ raise N` and
///   `IRQ lower N` lines whenever an intercepted line changes level, at any time, typically
///   just *before* the `OK` of the command that caused them. Such lines are never taken for a
///   reply: they update the level table ([`irq_level`](Self::irq_level)) and go to a bounded
///   queue ([`irq_events`](Self::irq_events), [`wait_irq`](Self::wait_irq)), oldest first.
/// - Every command has a deadline ([`Config::command_timeout`] or an explicit timeout).
///   When it passes, the command fails with [`Error::Timeout`]; its reply, if it comes later,
///   is recognised as late and discarded, so later commands still get their own replies.
/// - EOF or a reset from QEMU fails the waiting call at once with [`Error::Closed`] (not at
///   its deadline), and every later call too.
/// - QEMU aborts on many malformed commands (missing arguments, a port above 0xffff, a zero
///   `read` length), so the typed methods only ever send well-formed lines; the raw
///   [`command`](Self::command) refuses lines with a newline and is otherwise the caller's
///   responsibility.
#[derive(Debug)]
pub struct QtestProtocol {
    stream: UnixStream,
    config: Config,
    lines: LineBuffer,
    /// Unsent bytes of a command whose write timed out part-way: sent before the next one.
    out: Vec<u8>,
    irq_queue: VecDeque<IrqEvent>,
    irq_levels: BTreeMap<u32, bool>,
    irqs_dropped: u64,
    /// Replies still owed to commands that timed out: the next that many replies are late.
    late_replies: usize,
    late_discarded: u64,
    unexpected_lines: u64,
    closed: bool,
}

impl QtestProtocol {
    /// Adopts a connected stream (typically our end of the socketpair whose other end QEMU
    /// got as `-chardev socket,id=qtest,fd=N`) and makes it nonblocking.
    pub fn from_unix_stream(stream: UnixStream, config: Config) -> Result<Self> {
        stream.set_nonblocking(true).map_err(|source| Error::Io {
            command: None,
            source,
        })?;
        Ok(QtestProtocol {
            stream,
            lines: LineBuffer::new(config.max_line),
            config,
            out: Vec::new(),
            irq_queue: VecDeque::new(),
            irq_levels: BTreeMap::new(),
            irqs_dropped: 0,
            late_replies: 0,
            late_discarded: 0,
            unexpected_lines: 0,
            closed: false,
        })
    }

    /// Connects to a qtest server socket (QEMU started with
    /// `-qtest unix:PATH,server=on,wait=off` or similar).
    pub fn connect(path: &Path, config: Config) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        debug!("qtest: connected to {}", path.display());
        Self::from_unix_stream(stream, config)
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Changes the default per-command timeout.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.config.command_timeout = timeout;
    }

    /// Whether the peer has closed the connection.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    // ---- raw commands ---------------------------------------------------------------------

    /// Sends one raw command line (without newline) and returns the words after `OK`.
    pub fn command(&mut self, line: &str) -> Result<Vec<String>> {
        let timeout = self.config.command_timeout;
        self.command_with_timeout(line, timeout)
    }

    /// Like [`command`](Self::command) with an explicit timeout for this command.
    pub fn command_with_timeout(&mut self, line: &str, timeout: Duration) -> Result<Vec<String>> {
        if line.is_empty() {
            return Err(Error::InvalidCommand {
                command: line.to_owned(),
                reason: "empty command",
            });
        }
        if line.contains(['\n', '\r', '\0']) {
            return Err(Error::InvalidCommand {
                command: line.to_owned(),
                reason: "a command is one line without control characters",
            });
        }
        let deadline = Instant::now() + timeout;
        self.send(line, deadline, timeout)?;
        self.await_reply(line, deadline, timeout)
    }

    // ---- port I/O ---------------------------------------------------------------------------

    /// `outb PORT VALUE`.
    pub fn outb(&mut self, port: u16, value: u8) -> Result<()> {
        self.expect_ok(&format!("outb {port:#x} {value:#x}"))
    }

    /// `outw PORT VALUE`.
    pub fn outw(&mut self, port: u16, value: u16) -> Result<()> {
        self.expect_ok(&format!("outw {port:#x} {value:#x}"))
    }

    /// `outl PORT VALUE`.
    pub fn outl(&mut self, port: u16, value: u32) -> Result<()> {
        self.expect_ok(&format!("outl {port:#x} {value:#x}"))
    }

    /// `inb PORT`.
    pub fn inb(&mut self, port: u16) -> Result<u8> {
        self.value(&format!("inb {port:#x}"))
    }

    /// `inw PORT`.
    pub fn inw(&mut self, port: u16) -> Result<u16> {
        self.value(&format!("inw {port:#x}"))
    }

    /// `inl PORT`.
    pub fn inl(&mut self, port: u16) -> Result<u32> {
        self.value(&format!("inl {port:#x}"))
    }

    // ---- memory -----------------------------------------------------------------------------

    /// `readb ADDR` (guest-physical, through the first CPU's address space).
    pub fn readb(&mut self, addr: u64) -> Result<u8> {
        self.value(&format!("readb {addr:#x}"))
    }

    /// `readw ADDR`, in target byte order.
    pub fn readw(&mut self, addr: u64) -> Result<u16> {
        self.value(&format!("readw {addr:#x}"))
    }

    /// `readl ADDR`, in target byte order.
    pub fn readl(&mut self, addr: u64) -> Result<u32> {
        self.value(&format!("readl {addr:#x}"))
    }

    /// `readq ADDR`, in target byte order.
    pub fn readq(&mut self, addr: u64) -> Result<u64> {
        self.value(&format!("readq {addr:#x}"))
    }

    /// `writeb ADDR VALUE`.
    pub fn writeb(&mut self, addr: u64, value: u8) -> Result<()> {
        self.expect_ok(&format!("writeb {addr:#x} {value:#x}"))
    }

    /// `writew ADDR VALUE`, in target byte order.
    pub fn writew(&mut self, addr: u64, value: u16) -> Result<()> {
        self.expect_ok(&format!("writew {addr:#x} {value:#x}"))
    }

    /// `writel ADDR VALUE`, in target byte order.
    pub fn writel(&mut self, addr: u64, value: u32) -> Result<()> {
        self.expect_ok(&format!("writel {addr:#x} {value:#x}"))
    }

    /// `writeq ADDR VALUE`, in target byte order.
    pub fn writeq(&mut self, addr: u64, value: u64) -> Result<()> {
        self.expect_ok(&format!("writeq {addr:#x} {value:#x}"))
    }

    /// Reads `len` bytes at `addr` with `read` (hex on the wire). Zero bytes are read without
    /// asking QEMU (which would abort); large reads are split to respect `max_line`.
    pub fn read(&mut self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let chunk = self.chunk_len(2);
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = chunk.min(len - out.len());
            let at = offset(addr, out.len());
            let command = format!("read {at:#x} {n:#x}");
            let words = self.command(&command)?;
            let bytes = match words.as_slice() {
                [word] => wire::hex_decode(word).filter(|b| b.len() == n),
                _ => None,
            };
            match bytes {
                Some(bytes) => out.extend_from_slice(&bytes),
                None => return Err(bad_reply(&command, &words)),
            }
        }
        Ok(out)
    }

    /// Writes `data` at `addr` with `write` (hex on the wire). Empty data is a no-op.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        let chunk = self.chunk_len(2);
        for (i, part) in data.chunks(chunk).enumerate() {
            let at = offset(addr, i * chunk);
            let hex = wire::hex_encode(part);
            self.expect_ok(&format!("write {at:#x} {:#x} {hex}", part.len()))?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `addr` with `b64read` (base64 on the wire: a third smaller than
    /// hex). Zero bytes are read without asking QEMU.
    pub fn b64read(&mut self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let chunk = self.chunk_len(2);
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = chunk.min(len - out.len());
            let at = offset(addr, out.len());
            let command = format!("b64read {at:#x} {n:#x}");
            let words = self.command(&command)?;
            let bytes = match words.as_slice() {
                [word] => wire::b64_decode(word).filter(|b| b.len() == n),
                _ => None,
            };
            match bytes {
                Some(bytes) => out.extend_from_slice(&bytes),
                None => return Err(bad_reply(&command, &words)),
            }
        }
        Ok(out)
    }

    /// Writes `data` at `addr` with `b64write`. Empty data is a no-op.
    pub fn b64write(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        let chunk = self.chunk_len(2);
        for (i, part) in data.chunks(chunk).enumerate() {
            let at = offset(addr, i * chunk);
            let b64 = wire::b64_encode(part);
            self.expect_ok(&format!("b64write {at:#x} {:#x} {b64}", part.len()))?;
        }
        Ok(())
    }

    /// `memset ADDR LEN BYTE`: fills `len` bytes at `addr` with `byte`.
    pub fn memset(&mut self, addr: u64, len: u64, byte: u8) -> Result<()> {
        self.expect_ok(&format!("memset {addr:#x} {len:#x} {byte:#x}"))
    }

    // ---- clock, target ----------------------------------------------------------------------

    /// `clock_step [NS]`: advances the virtual clock by `ns`, or to the next timer deadline
    /// when None; returns the clock afterwards, in nanoseconds. Needs `-accel qtest`: under
    /// another accelerator QEMU answers `FAIL Unknown command 'clock_step'`. A step that does
    /// not move the clock (0) fails with `could not advance time` (seen on QEMU 11.1).
    pub fn clock_step(&mut self, ns: Option<u64>) -> Result<u64> {
        let command = match ns {
            Some(ns) => format!("clock_step {}", clock_arg(ns)?),
            None => "clock_step".to_owned(),
        };
        self.value(&command)
    }

    /// `clock_set NS`: advances the virtual clock to `ns` (no-op if already past); returns the
    /// clock afterwards. Needs `-accel qtest`.
    pub fn clock_set(&mut self, ns: u64) -> Result<u64> {
        self.value(&format!("clock_set {}", clock_arg(ns)?))
    }

    /// `endianness`: the target's byte order.
    pub fn endianness(&mut self) -> Result<Endianness> {
        let command = "endianness";
        let words = self.command(command)?;
        match words.as_slice() {
            [w] if w == "little" => Ok(Endianness::Little),
            [w] if w == "big" => Ok(Endianness::Big),
            _ => Err(bad_reply(command, &words)),
        }
    }

    // ---- IRQs -------------------------------------------------------------------------------

    /// `irq_intercept_in QOM-PATH`: report the device's unnamed GPIO inputs as `IRQ` lines
    /// (on a PC, `ioapic` gives the ISA IRQs). QEMU allows one intercepted device per run.
    pub fn irq_intercept_in(&mut self, qom_path: &str) -> Result<()> {
        check_word(qom_path, QOM_PATH_WORD)?;
        self.expect_ok(&format!("irq_intercept_in {qom_path}"))
    }

    /// `irq_intercept_out QOM-PATH`: report the device's unnamed GPIO outputs as `IRQ` lines.
    pub fn irq_intercept_out(&mut self, qom_path: &str) -> Result<()> {
        check_word(qom_path, QOM_PATH_WORD)?;
        self.expect_ok(&format!("irq_intercept_out {qom_path}"))
    }

    /// `set_irq_in QOM-PATH NAME NUM LEVEL`: forces GPIO input `num` of the named list
    /// (None: the unnamed inputs) to `level`.
    pub fn set_irq_in(
        &mut self,
        qom_path: &str,
        name: Option<&str>,
        num: u32,
        level: i32,
    ) -> Result<()> {
        check_word(qom_path, QOM_PATH_WORD)?;
        let name = name.unwrap_or("unnamed-gpio-in");
        check_word(name, "a gpio list name must be one word without spaces")?;
        if i32::try_from(num).is_err() {
            return Err(Error::InvalidCommand {
                command: num.to_string(),
                reason: "gpio number out of range",
            });
        }
        self.expect_ok(&format!("set_irq_in {qom_path} {name} {num} {level}"))
    }

    /// The level of intercepted line `irq` as of the last line read (`true` = raised).
    /// Lines never reported are low, as QEMU resets its table when the channel opens.
    pub fn irq_level(&self, irq: u32) -> bool {
        self.irq_levels.get(&irq).copied().unwrap_or(false)
    }

    /// Takes the queued IRQ events, oldest first. Only events already read are returned;
    /// [`poll_irqs`](Self::poll_irqs) reads what is waiting on the socket without blocking.
    pub fn irq_events(&mut self) -> Vec<IrqEvent> {
        self.irq_queue.drain(..).collect()
    }

    /// Reads whatever QEMU has sent without blocking; returns how many IRQ events are queued.
    pub fn poll_irqs(&mut self) -> Result<usize> {
        self.pump(None)?;
        if !self.closed {
            // A deadline already past makes `fill` a single nonblocking read pass.
            self.fill(Instant::now(), None)?;
            self.pump(None)?;
        }
        Ok(self.irq_queue.len())
    }

    /// Waits for the next `IRQ` event on line `irq` with the given edge and removes it from
    /// the queue; other events stay queued in order.
    pub fn wait_irq(&mut self, irq: u32, edge: IrqEdge, timeout: Duration) -> Result<IrqEvent> {
        self.wait_irq_where(Some(irq), timeout, |e| e.irq == irq && e.edge == edge)
    }

    /// Waits for the next IRQ event of any line and removes it from the queue.
    pub fn next_irq(&mut self, timeout: Duration) -> Result<IrqEvent> {
        self.wait_irq_where(None, timeout, |_| true)
    }

    /// Waits until line `irq` is at `level` per the level table (at once if it already is);
    /// the event queue is left untouched.
    pub fn wait_irq_level(&mut self, irq: u32, level: bool, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.pump(None)?;
            if self.irq_level(irq) == level {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::IrqTimeout {
                    irq: Some(irq),
                    timeout,
                });
            }
            self.fill(deadline, None)?;
        }
    }

    /// Events dropped because the queue was full (the level table still saw them).
    pub fn irq_events_dropped(&self) -> u64 {
        self.irqs_dropped
    }

    /// Late replies (to commands that had timed out) discarded so far.
    pub fn late_replies_discarded(&self) -> u64 {
        self.late_discarded
    }

    /// Lines that were neither an IRQ nor owed as a reply (logged and dropped).
    pub fn unexpected_lines(&self) -> u64 {
        self.unexpected_lines
    }

    // ---- internals --------------------------------------------------------------------------

    fn wait_irq_where(
        &mut self,
        irq: Option<u32>,
        timeout: Duration,
        pred: impl Fn(&IrqEvent) -> bool,
    ) -> Result<IrqEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            self.pump(None)?;
            if let Some(pos) = self.irq_queue.iter().position(&pred) {
                if let Some(event) = self.irq_queue.remove(pos) {
                    return Ok(event);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::IrqTimeout { irq, timeout });
            }
            self.fill(deadline, None)?;
        }
    }

    fn expect_ok(&mut self, command: &str) -> Result<()> {
        let words = self.command(command)?;
        if words.is_empty() {
            Ok(())
        } else {
            Err(bad_reply(command, &words))
        }
    }

    /// Runs a command whose reply is `OK VALUE` and converts VALUE to `T`.
    fn value<T: TryFrom<u64>>(&mut self, command: &str) -> Result<T> {
        let words = self.command(command)?;
        match words.as_slice() {
            [word] => wire::parse_u64(word)
                .and_then(|v| T::try_from(v).ok())
                .ok_or_else(|| bad_reply(command, &words)),
            _ => Err(bad_reply(command, &words)),
        }
    }

    /// Largest transfer per command such that `expansion` characters per byte fit a line.
    fn chunk_len(&self, expansion: usize) -> usize {
        ((self.config.max_line.saturating_sub(64)) / expansion).clamp(1, 1 << 20)
    }

    fn send(&mut self, line: &str, deadline: Instant, timeout: Duration) -> Result<()> {
        if self.closed {
            return Err(Error::Closed {
                command: Some(line.to_owned()),
                unread: Vec::new(),
            });
        }
        // The rest of an earlier, timed-out command must reach QEMU first, or the two would
        // merge into one garbled line.
        if !self.out.is_empty() && !self.flush(deadline, line)? {
            return Err(Error::Timeout {
                command: line.to_owned(),
                timeout,
            });
        }
        debug!("qtest --> {line}");
        self.out.reserve(line.len() + 1);
        self.out.extend_from_slice(line.as_bytes());
        self.out.push(b'\n');
        let total = self.out.len();
        if self.flush(deadline, line)? {
            return Ok(());
        }
        if self.out.len() == total {
            // Nothing of it left: drop it, it never happened.
            self.out.clear();
        } else {
            // QEMU has part of it and will run it once the rest arrives: its reply is owed.
            self.late_replies += 1;
        }
        Err(Error::Timeout {
            command: line.to_owned(),
            timeout,
        })
    }

    /// Writes `self.out` until empty (true) or the deadline (false), reading meanwhile so
    /// QEMU never blocks on a full socket while we wait for it to read.
    fn flush(&mut self, deadline: Instant, command: &str) -> Result<bool> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => {
                    return Err(self.closed_error(Some(command)));
                }
                Ok(n) => {
                    trace!("qtest wrote {n} bytes");
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let ready = self.wait_ready(true, deadline, Some(command))?;
                    if ready.readable {
                        self.read_available(Some(command))?;
                    }
                    if (!ready.writable && !ready.readable) || Instant::now() >= deadline {
                        return Ok(false);
                    }
                }
                Err(e) if is_disconnect(&e) => {
                    return Err(self.closed_error(Some(command)));
                }
                Err(source) => {
                    return Err(Error::Io {
                        command: Some(command.to_owned()),
                        source,
                    })
                }
            }
        }
        Ok(true)
    }

    fn await_reply(
        &mut self,
        command: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        // The deadline is checked on every pass, so a peer that never stops sending IRQ lines
        // cannot keep the call from timing out.
        loop {
            if let Some(reply) = self.pump(Some(command))? {
                return reply;
            }
            if Instant::now() >= deadline {
                self.late_replies += 1;
                return Err(Error::Timeout {
                    command: command.to_owned(),
                    timeout,
                });
            }
            self.fill(deadline, Some(command))?;
        }
    }

    /// Processes buffered lines: IRQ lines are recorded, late replies discarded. With a
    /// pending command, returns its reply when one is found; without, other lines are
    /// counted as unexpected.
    fn pump(&mut self, command: Option<&str>) -> Result<Option<Result<Vec<String>>>> {
        while let Some(framed) = self.lines.next_line() {
            let incoming = match framed {
                Framed::Line(line) => {
                    let incoming = wire::classify(&line);
                    if matches!(incoming, Incoming::Irq(_)) {
                        trace!("qtest <-- {}", wire::excerpt(&line));
                    } else {
                        debug!("qtest <-- {}", wire::excerpt(&line));
                    }
                    incoming
                }
                Framed::TooLong => {
                    if self.take_late() {
                        continue;
                    }
                    if let Some(command) = command {
                        return Ok(Some(Err(Error::LineTooLong {
                            command: Some(command.to_owned()),
                            limit: self.config.max_line,
                        })));
                    }
                    self.unexpected_lines += 1;
                    warn!(
                        "qtest: dropped a line over {} bytes with no command pending",
                        self.config.max_line
                    );
                    continue;
                }
            };
            let reply = match incoming {
                Incoming::Irq(event) => {
                    self.record_irq(event);
                    continue;
                }
                Incoming::BadIrq(line) => {
                    self.unexpected_lines += 1;
                    warn!("qtest: malformed IRQ line {line:?} ignored");
                    continue;
                }
                Incoming::Ok(words) => Ok(words),
                Incoming::Fail(message) => Err(Error::Failed {
                    command: command.unwrap_or_default().to_owned(),
                    message,
                }),
                Incoming::Other(line) => Err(Error::BadReply {
                    command: command.unwrap_or_default().to_owned(),
                    line,
                }),
            };
            if self.take_late() {
                debug!("qtest: discarded the late reply of a timed-out command");
                continue;
            }
            if command.is_some() {
                return Ok(Some(reply));
            }
            self.unexpected_lines += 1;
            warn!("qtest: unsolicited line with no command pending: {reply:?}");
        }
        Ok(None)
    }

    fn take_late(&mut self) -> bool {
        if self.late_replies > 0 {
            self.late_replies -= 1;
            self.late_discarded += 1;
            true
        } else {
            false
        }
    }

    fn record_irq(&mut self, event: IrqEvent) {
        self.irq_levels.insert(event.irq, event.edge.level());
        if self.irq_queue.len() >= self.config.irq_capacity.max(1) {
            self.irq_queue.pop_front();
            self.irqs_dropped += 1;
        }
        self.irq_queue.push_back(event);
    }

    /// Waits until readable (or the deadline) and reads all available bytes. Ok(true): bytes
    /// arrived; Ok(false): the deadline passed. EOF is [`Error::Closed`].
    fn fill(&mut self, deadline: Instant, command: Option<&str>) -> Result<bool> {
        if self.closed {
            return Err(self.closed_error(command));
        }
        loop {
            let ready = self.wait_ready(false, deadline, command)?;
            if !ready.readable {
                return Ok(false);
            }
            if self.read_available(command)? {
                return Ok(true);
            }
        }
    }

    /// Reads until `WouldBlock`, or until 64 KiB were read so that a peer that never stops
    /// sending cannot hold the caller past its deadline (poll is level-triggered: the rest
    /// is read on the next pass). Ok(true) if any byte was read.
    fn read_available(&mut self, command: Option<&str>) -> Result<bool> {
        let mut any = false;
        let mut chunk = [0u8; 8192];
        for _ in 0..8 {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    debug!("qtest: peer closed the connection");
                    // Bytes read before the EOF are still delivered; the next fill fails.
                    self.closed = true;
                    return if any {
                        Ok(true)
                    } else {
                        Err(self.closed_error(command))
                    };
                }
                Ok(n) => {
                    trace!("qtest read {n} bytes: {:?}", wire::excerpt(&chunk[..n]));
                    self.lines.feed(&chunk[..n]);
                    any = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) if is_disconnect(&e) => {
                    self.closed = true;
                    return if any {
                        Ok(true)
                    } else {
                        Err(self.closed_error(command))
                    };
                }
                Err(source) => {
                    return Err(Error::Io {
                        command: command.map(str::to_owned),
                        source,
                    })
                }
            }
        }
        Ok(any)
    }

    fn closed_error(&mut self, command: Option<&str>) -> Error {
        self.closed = true;
        Error::Closed {
            command: command.map(str::to_owned),
            unread: self.lines.pending().to_vec(),
        }
    }

    fn wait_ready(
        &self,
        writable: bool,
        deadline: Instant,
        command: Option<&str>,
    ) -> Result<crate::sys::Ready> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // HUP/ERR show up as readable: the read reports EOF or the error.
            match crate::sys::poll_one(self.stream.as_fd(), writable, left) {
                Ok(ready) => return Ok(ready),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::Io {
                        command: command.map(str::to_owned),
                        source,
                    })
                }
            }
        }
    }
}

impl AsFd for QtestProtocol {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

const QOM_PATH_WORD: &str = "a qom path must be one word without spaces";

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

fn bad_reply(command: &str, words: &[String]) -> Error {
    let mut line = String::from("OK");
    for w in words {
        line.push(' ');
        line.push_str(w);
    }
    line.truncate(256);
    Error::BadReply {
        command: command.to_owned(),
        line,
    }
}

fn offset(addr: u64, by: usize) -> u64 {
    addr.wrapping_add(by as u64)
}

/// QEMU parses clock arguments as signed 64-bit and aborts on overflow.
fn clock_arg(ns: u64) -> Result<i64> {
    i64::try_from(ns).map_err(|_| Error::InvalidCommand {
        command: ns.to_string(),
        reason: "clock value above i64::MAX nanoseconds",
    })
}

/// QEMU splits commands on single spaces: an argument must be one non-empty word.
fn check_word(word: &str, reason: &'static str) -> Result<()> {
    if word.is_empty() || word.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::InvalidCommand {
            command: word.to_owned(),
            reason,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    /// The scripted QEMU side of a socketpair.
    struct Peer {
        reader: BufReader<UnixStream>,
        writer: UnixStream,
    }

    impl Peer {
        fn expect(&mut self, line: &str) {
            let mut got = String::new();
            self.reader.read_line(&mut got).unwrap();
            assert_eq!(got, format!("{line}\n"));
        }

        fn send(&mut self, text: &str) {
            self.writer.write_all(text.as_bytes()).unwrap();
        }
    }

    fn scripted(
        config: Config,
        script: impl FnOnce(Peer) + Send + 'static,
    ) -> (QtestProtocol, JoinHandle<()>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let peer = Peer {
            reader: BufReader::new(theirs.try_clone().unwrap()),
            writer: theirs,
        };
        let handle = std::thread::spawn(move || script(peer));
        (
            QtestProtocol::from_unix_stream(ours, config).unwrap(),
            handle,
        )
    }

    fn raise(irq: u32) -> IrqEvent {
        IrqEvent {
            irq,
            edge: IrqEdge::Raise,
        }
    }

    fn lower(irq: u32) -> IrqEvent {
        IrqEvent {
            irq,
            edge: IrqEdge::Lower,
        }
    }

    #[test]
    fn irq_lines_before_the_reply_are_events_not_replies() {
        let (mut q, peer) = scripted(Config::default(), |mut p| {
            p.expect("irq_intercept_in ioapic");
            p.send("OK\n");
            p.expect("outb 0x60 0x5a");
            p.send("IRQ raise 1\nOK\n");
            p.expect("inb 0x60");
            // Split across writes and merged with the reply.
            p.send("IRQ lo");
            p.send("wer 1\nIRQ raise 4\nOK 0x005a\n");
        });
        q.irq_intercept_in("ioapic").unwrap();
        q.outb(0x60, 0x5a).unwrap();
        assert!(q.irq_level(1));
        assert_eq!(q.inb(0x60).unwrap(), 0x5a);
        assert!(!q.irq_level(1));
        assert!(q.irq_level(4));
        assert_eq!(q.irq_events(), vec![raise(1), lower(1), raise(4)]);
        assert!(q.irq_events().is_empty());
        peer.join().unwrap();
    }

    #[test]
    fn typed_commands_and_values() {
        let (mut q, peer) = scripted(Config::default(), |mut p| {
            for (cmd, reply) in [
                ("outl 0xcf8 0x80000b40", "OK"),
                ("inl 0xcfc", "OK 0x0601"),
                ("inw 0x608", "OK 0xbeef"),
                ("writel 0x1000 0xdeadbeef", "OK"),
                ("readl 0x1000", "OK 0x00000000deadbeef"),
                ("readq 0x1000", "OK 0x00000000deadbeef"),
                ("writeq 0x2000 0x123456789abcdef0", "OK"),
                ("readb 0x2000", "OK 0x00000000000000f0"),
                ("memset 0x3000 0x10 0xab", "OK"),
                ("clock_step", "OK 1000"),
                ("clock_step 500", "OK 1500"),
                ("clock_set 100000", "OK 100000"),
                ("endianness", "OK little"),
                ("set_irq_in ioapic unnamed-gpio-in 9 1", "OK"),
                ("set_irq_in /machine/x named 2 -1", "OK"),
                ("irq_intercept_out /machine/x", "OK"),
            ] {
                p.expect(cmd);
                p.send(&format!("{reply}\n"));
            }
        });
        q.outl(0xcf8, 0x8000_0b40).unwrap();
        assert_eq!(q.inl(0xcfc).unwrap(), 0x601);
        assert_eq!(q.inw(0x608).unwrap(), 0xbeef);
        q.writel(0x1000, 0xdead_beef).unwrap();
        assert_eq!(q.readl(0x1000).unwrap(), 0xdead_beef);
        assert_eq!(q.readq(0x1000).unwrap(), 0xdead_beef);
        q.writeq(0x2000, 0x1234_5678_9abc_def0).unwrap();
        assert_eq!(q.readb(0x2000).unwrap(), 0xf0);
        q.memset(0x3000, 16, 0xab).unwrap();
        assert_eq!(q.clock_step(None).unwrap(), 1000);
        assert_eq!(q.clock_step(Some(500)).unwrap(), 1500);
        assert_eq!(q.clock_set(100_000).unwrap(), 100_000);
        assert_eq!(q.endianness().unwrap(), Endianness::Little);
        q.set_irq_in("ioapic", None, 9, 1).unwrap();
        q.set_irq_in("/machine/x", Some("named"), 2, -1).unwrap();
        q.irq_intercept_out("/machine/x").unwrap();
        peer.join().unwrap();
    }

    #[test]
    fn fail_and_err_replies_are_typed_and_keep_the_stream_in_sync() {
        let (mut q, peer) = scripted(Config::default(), |mut p| {
            p.expect("clock_step");
            p.send("FAIL Unknown command 'clock_step'\n");
            p.expect("irq_intercept_in nothing");
            p.send("FAIL Unknown device\n");
            p.expect("bogus 1 2");
            p.send("ERR invalid argument size\n");
            p.expect("inb 0x61");
            p.send("OK 0x0030\n");
        });
        match q.clock_step(None) {
            Err(Error::Failed { command, message }) => {
                assert_eq!(command, "clock_step");
                assert_eq!(message, "Unknown command 'clock_step'");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            q.irq_intercept_in("nothing"),
            Err(Error::Failed { message, .. }) if message == "Unknown device"
        ));
        assert!(matches!(
            q.command("bogus 1 2"),
            Err(Error::Failed { message, .. }) if message == "invalid argument size"
        ));
        assert_eq!(q.inb(0x61).unwrap(), 0x30);
        peer.join().unwrap();
    }

    #[test]
    fn timeout_then_the_late_reply_is_discarded() {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (mut q, peer) = scripted(Config::default(), move |mut p| {
            p.expect("inb 0x61");
            go_rx.recv().unwrap();
            // The late reply, then the reply of the next command, in one write.
            p.expect("inb 0x62");
            p.send("OK 0x0001\nIRQ raise 3\nOK 0x0002\n");
        });
        let started = Instant::now();
        match q.command_with_timeout("inb 0x61", Duration::from_millis(50)) {
            Err(Error::Timeout { command, timeout }) => {
                assert_eq!(command, "inb 0x61");
                assert_eq!(timeout, Duration::from_millis(50));
            }
            other => panic!("unexpected {other:?}"),
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        go_tx.send(()).unwrap();
        assert_eq!(q.inb(0x62).unwrap(), 2);
        assert_eq!(q.late_replies_discarded(), 1);
        assert_eq!(q.irq_events(), vec![raise(3)]);
        peer.join().unwrap();
    }

    #[test]
    fn eof_fails_at_once_and_stays_closed() {
        let (mut q, peer) = scripted(
            Config::default().with_command_timeout(Duration::from_secs(20)),
            |mut p| {
                p.expect("inb 0x60");
                p.send("IRQ raise 1\nOK 0x");
                // Dropping the peer closes the socket mid-reply.
            },
        );
        let started = Instant::now();
        match q.inb(0x60) {
            Err(Error::Closed { command, unread }) => {
                assert_eq!(command.as_deref(), Some("inb 0x60"));
                assert_eq!(unread, b"OK 0x");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(q.is_closed());
        assert!(q.irq_level(1), "the IRQ line before EOF is still seen");
        assert!(matches!(q.outb(0x80, 1), Err(Error::Closed { .. })));
        assert!(matches!(
            q.next_irq(Duration::from_secs(20)),
            Ok(e) if e == raise(1)
        ));
        assert!(matches!(
            q.next_irq(Duration::from_secs(20)),
            Err(Error::Closed { command: None, .. })
        ));
        peer.join().unwrap();
    }

    #[test]
    fn a_reply_that_arrives_with_the_eof_is_still_delivered() {
        let (mut q, peer) = scripted(Config::default(), |mut p| {
            p.expect("endianness");
            p.send("OK big\n");
        });
        // The peer writes the reply and closes at once: the reply still wins over the EOF.
        assert_eq!(q.endianness().unwrap(), Endianness::Big);
        peer.join().unwrap();
        assert!(matches!(q.inb(1), Err(Error::Closed { .. })));
    }

    #[test]
    fn garbage_replies_are_bad_replies_and_do_not_desync() {
        let (mut q, peer) = scripted(Config::default(), |mut p| {
            p.expect("inb 0x60");
            p.send("hello there\n");
            p.expect("inb 0x61");
            p.send("OK zz\n");
            p.expect("inb 0x62");
            p.send("OK 0x1ff\n");
            p.expect("outb 0x80 0x1");
            p.send("OK 0x1\n");
            p.expect("readl 0x0");
            p.send("IRQ sideways 3\n\u{ff}\nOK 0x7\n");
            p.expect("endianness");
            p.send("OK middle\n");
        });
        assert!(matches!(
            q.inb(0x60),
            Err(Error::BadReply { command, line }) if command == "inb 0x60" && line == "hello there"
        ));
        assert!(matches!(q.inb(0x61), Err(Error::BadReply { line, .. }) if line == "OK zz"));
        assert!(matches!(q.inb(0x62), Err(Error::BadReply { .. })));
        assert!(matches!(q.outb(0x80, 1), Err(Error::BadReply { .. })));
        // The malformed IRQ line is dropped; the non-UTF-8 line is taken as the reply.
        assert!(matches!(q.readl(0), Err(Error::BadReply { .. })));
        assert_eq!(q.unexpected_lines(), 1);
        // The extra "OK 0x7" is now one reply ahead: this shows why a bad reply still
        // consumes the slot of exactly one command.
        assert!(matches!(q.endianness(), Err(Error::BadReply { line, .. }) if line == "OK 0x7"));
        peer.join().unwrap();
    }

    #[test]
    fn oversized_line_is_reported_and_skipped() {
        let (mut q, peer) = scripted(Config::default().with_max_line(64), |mut p| {
            p.expect("inl 0x0");
            p.send(&format!("OK 0x{}\n", "f".repeat(200)));
            p.expect("inl 0x4");
            p.send("OK 0x2\n");
        });
        assert!(matches!(
            q.inl(0),
            Err(Error::LineTooLong { limit: 64, command: Some(c) }) if c == "inl 0x0"
        ));
        assert_eq!(q.inl(4).unwrap(), 2);
        peer.join().unwrap();
    }

    #[test]
    fn invalid_commands_are_refused_before_sending() {
        let (mut q, peer) = scripted(Config::default(), |mut p| {
            // Only this command reaches the peer.
            p.expect("endianness");
            p.send("OK little\n");
        });
        for bad in ["", "inb 0x60\ninb 0x61", "a\rb"] {
            assert!(matches!(q.command(bad), Err(Error::InvalidCommand { .. })));
        }
        assert!(matches!(
            q.irq_intercept_in("two words"),
            Err(Error::InvalidCommand { .. })
        ));
        assert!(matches!(
            q.irq_intercept_in(""),
            Err(Error::InvalidCommand { .. })
        ));
        assert!(matches!(
            q.set_irq_in("ioapic", Some("a b"), 1, 1),
            Err(Error::InvalidCommand { .. })
        ));
        assert!(matches!(
            q.set_irq_in("ioapic", None, u32::MAX, 1),
            Err(Error::InvalidCommand { .. })
        ));
        assert!(matches!(
            q.clock_step(Some(u64::MAX)),
            Err(Error::InvalidCommand { .. })
        ));
        assert!(q.read(0x1000, 0).unwrap().is_empty());
        q.write(0x1000, &[]).unwrap();
        q.b64write(0x1000, &[]).unwrap();
        assert!(q.b64read(0x1000, 0).unwrap().is_empty());
        assert_eq!(q.endianness().unwrap(), Endianness::Little);
        peer.join().unwrap();
    }

    #[test]
    fn bulk_transfers_are_split_to_fit_max_line() {
        let data: Vec<u8> = (0..40u8).collect();
        let expected = data.clone();
        let (mut q, peer) = scripted(Config::default().with_max_line(128), move |mut p| {
            // (128 - 64) / 2 = 32 bytes per command.
            p.expect(&format!(
                "write 0x1000 0x20 {}",
                wire::hex_encode(&expected[..32])
            ));
            p.send("OK\n");
            p.expect(&format!(
                "write 0x1020 0x8 {}",
                wire::hex_encode(&expected[32..])
            ));
            p.send("OK\n");
            p.expect("read 0x1000 0x20");
            p.send(&format!("OK {}\n", wire::hex_encode(&expected[..32])));
            p.expect("read 0x1020 0x8");
            p.send(&format!("OK {}\n", wire::hex_encode(&expected[32..])));
            p.expect(&format!(
                "b64write 0x2000 0x20 {}",
                wire::b64_encode(&expected[..32])
            ));
            p.send("OK\n");
            p.expect(&format!(
                "b64write 0x2020 0x8 {}",
                wire::b64_encode(&expected[32..])
            ));
            p.send("OK\n");
            p.expect("b64read 0x2000 0x20");
            p.send(&format!("OK {}\n", wire::b64_encode(&expected[..32])));
            p.expect("b64read 0x2020 0x8");
            p.send(&format!("OK {}\n", wire::b64_encode(&expected[32..])));
            p.expect("read 0x0 0x4");
            p.send("OK 0x0102\n");
        });
        q.write(0x1000, &data).unwrap();
        assert_eq!(q.read(0x1000, 40).unwrap(), data);
        q.b64write(0x2000, &data).unwrap();
        assert_eq!(q.b64read(0x2000, 40).unwrap(), data);
        assert!(
            matches!(q.read(0, 4), Err(Error::BadReply { .. })),
            "a short read reply is refused"
        );
        peer.join().unwrap();
    }

    #[test]
    fn wait_irq_matches_and_keeps_other_events_queued() {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (mut q, peer) = scripted(Config::default(), move |mut p| {
            go_rx.recv().unwrap();
            p.send("IRQ raise 1\nIRQ raise 3\nIRQ lower 1\n");
            go_rx.recv().unwrap();
            p.send("IRQ lower 3\n");
        });
        go_tx.send(()).unwrap();
        assert_eq!(
            q.wait_irq(1, IrqEdge::Lower, Duration::from_secs(10))
                .unwrap(),
            lower(1)
        );
        assert_eq!(q.irq_events(), vec![raise(1), raise(3)]);
        assert!(q.irq_level(3));
        let started = Instant::now();
        assert!(matches!(
            q.wait_irq(3, IrqEdge::Lower, Duration::from_millis(30)),
            Err(Error::IrqTimeout { irq: Some(3), .. })
        ));
        assert!(started.elapsed() >= Duration::from_millis(30));
        go_tx.send(()).unwrap();
        q.wait_irq_level(3, false, Duration::from_secs(10)).unwrap();
        assert_eq!(q.next_irq(Duration::from_secs(10)).unwrap(), lower(3));
        // Already at the level: returns at once without reading.
        q.wait_irq_level(3, false, Duration::ZERO).unwrap();
        assert_eq!(q.poll_irqs().unwrap(), 0);
        peer.join().unwrap();
    }

    #[test]
    fn an_endless_irq_flood_cannot_hold_a_command_past_its_deadline() {
        let (mut q, peer) = scripted(Config::default().with_irq_capacity(16), |mut p| {
            p.expect("inb 0x60");
            let burst = "IRQ raise 5\nIRQ lower 5\n".repeat(256);
            // Until the client hangs up (the write then fails).
            while p.writer.write_all(burst.as_bytes()).is_ok() {}
        });
        let started = Instant::now();
        assert!(matches!(
            q.command_with_timeout("inb 0x60", Duration::from_millis(100)),
            Err(Error::Timeout { .. })
        ));
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(q.irq_events_dropped() > 0);
        assert_eq!(q.irq_events().len(), 16);
        drop(q);
        peer.join().unwrap();
    }

    #[test]
    fn full_irq_queue_drops_oldest_but_levels_stay_right() {
        let (mut q, peer) = scripted(Config::default().with_irq_capacity(2), |mut p| {
            p.expect("outb 0x60 0x1");
            p.send("IRQ raise 1\nIRQ raise 2\nIRQ lower 1\nOK\n");
        });
        q.outb(0x60, 1).unwrap();
        assert_eq!(q.irq_events_dropped(), 1);
        assert_eq!(q.irq_events(), vec![raise(2), lower(1)]);
        assert!(!q.irq_level(1));
        assert!(q.irq_level(2));
        peer.join().unwrap();
    }

    #[test]
    fn unsolicited_lines_are_not_taken_for_the_next_reply() {
        let (mut q, peer) = scripted(Config::default(), |mut p| {
            p.send("OK stray\nIRQ raise 2\n");
            p.expect("inb 0x64");
            p.send("OK 0x0019\n");
        });
        q.wait_irq(2, IrqEdge::Raise, Duration::from_secs(10))
            .unwrap();
        assert_eq!(q.unexpected_lines(), 1);
        assert_eq!(q.inb(0x64).unwrap(), 0x19);
        peer.join().unwrap();
    }

    #[test]
    fn a_write_that_times_out_part_way_is_completed_before_the_next_command() {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let data = vec![0x5au8; 1 << 20];
        let (mut q, peer) = scripted(Config::default(), move |mut p| {
            // Do not read until the client's write has timed out.
            go_rx.recv().unwrap();
            let mut line = String::new();
            p.reader.read_line(&mut line).unwrap();
            assert!(line.starts_with("write 0x0 0x100000 0x5a5a"));
            assert_eq!(line.len(), "write 0x0 0x100000 0x".len() + (2 << 20) + 1);
            p.send("OK\n");
            p.expect("inb 0x60");
            p.send("OK 0x0042\n");
        });
        q.set_command_timeout(Duration::from_millis(50));
        assert!(matches!(
            q.write(0, &data),
            Err(Error::Timeout { command, .. }) if command.starts_with("write 0x0 0x100000 ")
        ));
        go_tx.send(()).unwrap();
        q.set_command_timeout(Duration::from_secs(10));
        assert_eq!(q.inb(0x60).unwrap(), 0x42);
        assert_eq!(q.late_replies_discarded(), 1);
        peer.join().unwrap();
    }
}
