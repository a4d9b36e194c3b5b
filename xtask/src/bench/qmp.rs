//! QMP figures against one real QEMU (`-M none`, TCG) with three monitors: one for our
//! `qmp_client::Connection`, one for a raw blocking socket loop (the baseline: one write per
//! request, read up to the reply's line end), one for QEMU's Python `qemu.qmp` (the anchor).
//! All three negotiate the same capabilities and send the same commands; rounds rotate which
//! side goes first.
//!
//! - `qmp/roundtrip`: `query-status` round trip (target: <= 1.1x the raw loop).
//! - `qmp/client-cpu`: our thread's CPU time per round trip beside the raw loop's, user and
//!   system apart (target: at most 10 us more than the raw loop, which is the kernel's share).
//! - `qmp/events`: K `stop`/`cont` pairs, each command's STOP/RESUME event received; events
//!   per second (target: >= 0.9x the raw reader) and 0 lost.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use qmp_client::{Config, Connection};

use crate::e2e::{QemuChild, QemuCommand};

use super::python::{self, Anchor};
use super::{measure, Cpu, Figure, Settings, Target};

/// Measures the QMP figures `settings` selects.
pub fn run(settings: &Settings) -> Result<Vec<Figure>, String> {
    let mut roundtrip = Figure::new(
        "qmp/roundtrip",
        "QMP round trip (`query-status`)",
        "us",
        "qmp_client::Connection",
        "raw blocking socket",
        Target::RatioAtMost(1.1),
    );
    let mut cpu = Figure::new(
        "qmp/client-cpu",
        "QMP client CPU per round trip",
        "us",
        "qmp_client::Connection",
        "raw blocking socket",
        Target::DiffAtMost(10.0),
    );
    let mut events = Figure::new(
        "qmp/events",
        "QMP events received (`stop`/`cont` pairs)",
        "events/s",
        "qmp_client::Connection",
        "raw socket reader",
        Target::RatioAtLeast(0.9),
    );
    let want_roundtrip = [&roundtrip, &cpu]
        .iter()
        .any(|f| settings.wants(&f.id, &f.name));
    let want_events = settings.wants(&events.id, &events.name);
    if !want_roundtrip && !want_events {
        return Ok(Vec::new());
    }

    let mut qemu = Qemu::start(settings)?;
    let (rounds, per_round, pairs) = settings.pick((20, 100, 50), (3, 20, 10));
    // Warm-up: page cache, lazy statics, QEMU's first replies.
    for _ in 0..per_round {
        qemu.client_roundtrip()?;
        qemu.raw.execute("query-status")?;
    }
    if let Some(anchor) = &mut qemu.anchor {
        anchor.run("roundtrip", per_round)?;
    }
    if want_roundtrip {
        let mut anchor_side = qemu
            .anchor
            .as_ref()
            .map(|_| super::stats::Side::new(python::NAME));
        for round in 0..rounds {
            for side in rotation(round, qemu.anchor.is_some()) {
                match side {
                    Who::Ours => {
                        let (result, wall, used) = measure(Cpu::thread, || {
                            (0..per_round).try_for_each(|_| qemu.client_roundtrip())
                        });
                        result?;
                        roundtrip
                            .ours
                            .push(us_per(wall, per_round), used, per_round);
                        let (user, system) = used.per_op_us(per_round);
                        cpu.ours.push(user + system, used, per_round);
                    }
                    Who::Raw => {
                        let (result, wall, used) = measure(Cpu::thread, || {
                            (0..per_round)
                                .try_for_each(|_| qemu.raw.execute("query-status").map(drop))
                        });
                        result?;
                        roundtrip
                            .baseline
                            .push(us_per(wall, per_round), used, per_round);
                        let (user, system) = used.per_op_us(per_round);
                        cpu.baseline.push(user + system, used, per_round);
                    }
                    Who::Anchor => {
                        if let (Some(anchor), Some(side)) = (&mut qemu.anchor, &mut anchor_side) {
                            let block = anchor.run("roundtrip", per_round)?;
                            side.push(us_per(block.wall, per_round), block.cpu, per_round);
                        }
                    }
                }
            }
        }
        roundtrip.anchor = anchor_side.clone();
        if let Some(side) = anchor_side {
            let mut cpu_side = super::stats::Side::new(python::NAME);
            for &(user, system) in &side.cpu_us {
                cpu_side.values.push(user + system);
                cpu_side.cpu_us.push((user, system));
            }
            cpu.anchor = Some(cpu_side);
        }
        for figure in [&mut roundtrip, &mut cpu] {
            figure.notes.push(format!(
                "{rounds} rounds of {per_round} round trips per side, QEMU -M none (tcg), oob negotiated by all"
            ));
        }
        if let Some(reason) = &qemu.anchor_missing {
            roundtrip
                .notes
                .push(format!("{} not measured: {reason}", python::NAME));
        }
    }

    if want_events {
        let mut anchor_side = qemu
            .anchor
            .as_ref()
            .map(|_| super::stats::Side::new(python::NAME));
        let ops = 2 * pairs;
        let (mut lost_ours, mut lost_raw, mut lost_anchor) = (0u64, 0u64, 0u64);
        for round in 0..rounds {
            for side in rotation(round, qemu.anchor.is_some()) {
                match side {
                    Who::Ours => {
                        let (result, wall, used) =
                            measure(Cpu::thread, || qemu.client_events(pairs));
                        lost_ours += (ops as u64).abs_diff(result?);
                        events.ours.push(per_second(ops, wall), used, ops);
                    }
                    Who::Raw => {
                        let (result, wall, used) = measure(Cpu::thread, || qemu.raw.events(pairs));
                        lost_raw += (ops as u64).abs_diff(result?);
                        events.baseline.push(per_second(ops, wall), used, ops);
                    }
                    Who::Anchor => {
                        if let (Some(anchor), Some(side)) = (&mut qemu.anchor, &mut anchor_side) {
                            let block = anchor.run("events", pairs)?;
                            lost_anchor += (ops as u64).abs_diff(block.received);
                            side.push(per_second(ops, block.wall), block.cpu, ops);
                        }
                    }
                }
            }
        }
        let dropped = qemu.client.events_dropped();
        events.check(
            format!("events missing or extra: {lost_ours} (queue overflows: {dropped})"),
            lost_ours == 0 && dropped == 0,
        );
        events.check(
            format!("events missing or extra at the raw reader: {lost_raw}"),
            lost_raw == 0,
        );
        if anchor_side.is_some() {
            events.check(
                format!("events missing or extra at {}: {lost_anchor}", python::NAME),
                lost_anchor == 0,
            );
        }
        events.anchor = anchor_side;
        events.notes.push(format!(
            "{rounds} rounds of {pairs} stop/cont pairs per side (each command's reply and event awaited); CPU per event"
        ));
    }
    qemu.finish()?;

    let mut figures = Vec::new();
    for figure in [roundtrip, cpu] {
        if want_roundtrip && settings.wants(&figure.id, &figure.name) {
            figures.push(figure);
        }
    }
    if want_events {
        figures.push(events);
    }
    Ok(figures)
}

#[derive(Clone, Copy)]
enum Who {
    Ours,
    Raw,
    Anchor,
}

/// The order of the sides in `round`: rotated, so that no side always runs first.
fn rotation(round: usize, anchor: bool) -> Vec<Who> {
    let mut order = vec![Who::Ours, Who::Raw];
    if anchor {
        order.push(Who::Anchor);
    }
    let n = order.len();
    order.rotate_left(round % n);
    order
}

/// QEMU `-M none` (TCG) with one QMP monitor per name, each on a socketpair: returns the
/// child (log in the scratch directory under `log`) and our ends, in the order of `names`.
pub(super) fn spawn_monitors(
    settings: &Settings,
    log: &str,
    names: &[&str],
) -> Result<(QemuChild, Vec<UnixStream>), String> {
    let mut cmd = QemuCommand::new(crate::qemu::binary(), settings.scratch.join(log));
    cmd.args([
        "-M",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-accel",
        "tcg",
    ]);
    let mut ours = Vec::new();
    for name in names {
        let (mine, theirs) =
            UnixStream::pair().map_err(|e| format!("cannot create a socketpair: {e}"))?;
        let fd = cmd.pass_fd(OwnedFd::from(theirs));
        cmd.args(["-chardev", &format!("socket,id={name},fd={fd}")])
            .args(["-mon", &format!("chardev={name},mode=control")]);
        ours.push(mine);
    }
    Ok((cmd.spawn()?, ours))
}

/// `pairs` stop/cont pairs on `client`, each reply awaited; returns the STOP and RESUME
/// events that came with them.
pub(super) fn stop_cont_pairs(client: &mut Connection, pairs: usize) -> Result<u64, String> {
    let mut received = 0;
    for _ in 0..pairs {
        for (command, event) in [("stop", "STOP"), ("cont", "RESUME")] {
            client
                .execute(command, None)
                .map_err(|e| format!("{command}: {e}"))?;
            received += client
                .drain_events()
                .iter()
                .filter(|e| e.event == event)
                .count() as u64;
        }
    }
    Ok(received)
}

pub(super) fn us_per(wall: Duration, ops: usize) -> f64 {
    wall.as_secs_f64() * 1e6 / ops.max(1) as f64
}

pub(super) fn per_second(ops: usize, wall: Duration) -> f64 {
    ops as f64 / wall.as_secs_f64().max(1e-9)
}

/// QEMU with the three monitors connected.
struct Qemu {
    client: Connection,
    raw: Raw,
    anchor: Option<Anchor>,
    anchor_missing: Option<String>,
    child: QemuChild,
}

impl Qemu {
    fn start(settings: &Settings) -> Result<Qemu, String> {
        let (child, ours) = spawn_monitors(settings, "qemu-qmp.log", &["client", "raw", "anchor"])?;
        let mut ours = ours.into_iter();
        let (Some(client), Some(raw), Some(anchor)) = (ours.next(), ours.next(), ours.next())
        else {
            return Err("three socketpairs expected".to_string());
        };
        let config = Config::default().with_greeting_timeout(Duration::from_secs(10));
        let mut client = Connection::from_unix_stream(client, &config)
            .map_err(|e| format!("client handshake: {e}; qemu log: {}", child.log_tail()))?;
        if !client.oob_enabled() {
            return Err("QEMU offered no oob: the raw loop's negotiation would differ".into());
        }
        let raw = Raw::new(raw)?;
        let (anchor, anchor_missing) = match Anchor::start(OwnedFd::from(anchor), &settings.scratch)
        {
            Ok(anchor) => (Some(anchor), None),
            Err(reason) => {
                eprintln!("xtask bench: {} not measured: {reason}", python::NAME);
                (None, Some(reason))
            }
        };
        Ok(Qemu {
            client,
            raw,
            anchor,
            anchor_missing,
            child,
        })
    }

    fn client_roundtrip(&mut self) -> Result<(), String> {
        let status = self
            .client
            .execute("query-status", None)
            .map_err(|e| format!("query-status: {e}"))?;
        if status.get("status").is_none() {
            return Err(format!("query-status returned {status}"));
        }
        Ok(())
    }

    /// `pairs` stop/cont pairs; returns the STOP and RESUME events received. Every monitor
    /// gets every event: a first round trip brings in those the other sides caused (they
    /// come before its reply), and they are dropped.
    fn client_events(&mut self, pairs: usize) -> Result<u64, String> {
        self.client_roundtrip()?;
        self.client.clear_events();
        stop_cont_pairs(&mut self.client, pairs)
    }

    fn finish(mut self) -> Result<(), String> {
        if let Some(anchor) = self.anchor.take() {
            anchor.quit()?;
        }
        self.client
            .execute("quit", None)
            .map_err(|e| format!("quit: {e}"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = self.child.wait_until(deadline)?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "QEMU exited with {status}: {}",
                self.child.log_tail()
            ))
        }
    }
}

/// The baseline: a blocking socket, one write per request, read up to the reply's CRLF. It
/// sends the bytes our client sends, ids included (QEMU 7.2 reads one byte per system call,
/// so every byte counts): both sides run the same commands, so their ids stay equal.
struct Raw {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    line: String,
    request: Vec<u8>,
    next_id: u64,
}

impl Raw {
    fn new(stream: UnixStream) -> Result<Raw, String> {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| format!("set_read_timeout: {e}"))?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| format!("dup: {e}"))?);
        let mut raw = Raw {
            writer: stream,
            reader,
            line: String::new(),
            request: Vec::with_capacity(64),
            next_id: 2,
        };
        raw.read_line()?; // the greeting
        raw.roundtrip(br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":1}"#)?;
        Ok(raw)
    }

    fn read_line(&mut self) -> Result<(), String> {
        self.line.clear();
        match self.reader.read_line(&mut self.line) {
            Ok(0) => Err("QEMU closed the raw monitor".to_string()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("raw read: {e}")),
        }
    }

    /// Runs `command` (no arguments) with the next id; returns the events read before its
    /// reply.
    fn execute(&mut self, command: &str) -> Result<u64, String> {
        let mut request = std::mem::take(&mut self.request);
        request.clear();
        write!(
            request,
            "{{\"execute\":\"{command}\",\"id\":{}}}",
            self.next_id
        )
        .map_err(|e| e.to_string())?;
        self.next_id += 1;
        let result = self.roundtrip(&request);
        self.request = request;
        result
    }

    /// Sends `request` and reads up to its reply; returns the events read before it.
    fn roundtrip(&mut self, request: &[u8]) -> Result<u64, String> {
        self.writer
            .write_all(request)
            .map_err(|e| format!("raw write: {e}"))?;
        let mut events = 0;
        loop {
            self.read_line()?;
            // QEMU writes an event's timestamp first: `{"timestamp": ..., "event": ...}`.
            if self.line.contains("\"return\"") {
                return Ok(events);
            } else if self.line.contains("\"event\"") {
                events += 1;
            } else {
                return Err(format!("raw reply: {}", self.line.trim()));
            }
        }
    }

    /// `pairs` stop/cont pairs; returns the events received (after dropping, as the client
    /// does, those the other sides caused).
    fn events(&mut self, pairs: usize) -> Result<u64, String> {
        self.execute("query-status")?;
        let mut received = 0;
        for _ in 0..pairs {
            received += self.execute("stop")?;
            received += self.execute("cont")?;
        }
        Ok(received)
    }
}
