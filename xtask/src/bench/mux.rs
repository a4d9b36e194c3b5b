//! The QMP multiplexer's figures against one real QEMU (`-M none`, TCG) with two monitors:
//! one owned by our `Connection` and shared through a `MuxServer` (clients attach to its unix
//! socket), one for a client on the monitor directly (the baseline). The owner's loop runs on
//! its own thread with one `mio::Poll`, as an application embedding the library would.
//!
//! - `mux/roundtrip`: `query-status` round trip of our `Connection` through the multiplexer
//!   beside the same client on the other monitor directly (target: <= 1.2x).
//! - `mux/events-1`, `mux/events-10`: a `stop`/`cont` burst sent by the direct client; every
//!   event received by each of 1 or 10 reading clients of the multiplexer, beside the direct
//!   client's own reception (events/s of the slowest client; 0 lost is a check).
//! - `mux/client-memory`: heap held per idle negotiated client (the multiplexer's own
//!   accounting of its queues and decoders), beside the process's RSS growth per client.
//! - a client that never reads, during a burst: dropped, with its queue bounded (a check on
//!   `mux/events-10`).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use qmp_client::{Config, Connection, Mux, MuxConfig, MuxServer, ShareAddress};
use qmp_proto::EventFilter;

use crate::e2e::QemuChild;

use super::qmp::{per_second, spawn_monitors, stop_cont_pairs, us_per};
use super::{measure, Cpu, Figure, Settings, Target};

/// Queue limit of the multiplexer in these figures: small, so that a never-reading client
/// overflows within a short burst.
const QUEUE_LIMIT: usize = 64 * 1024;

/// Measures the multiplexer figures `settings` selects.
pub fn run(settings: &Settings) -> Result<Vec<Figure>, String> {
    let mut roundtrip = Figure::new(
        "mux/roundtrip",
        "QMP round trip through the multiplexer (`query-status`)",
        "us",
        "Connection via MuxServer",
        "Connection on a monitor directly",
        Target::RatioAtMost(1.2),
    );
    let mut events1 = events_figure(1);
    let mut events10 = events_figure(10);
    let mut memory = Figure::new(
        "mux/client-memory",
        "memory per idle negotiated client of the multiplexer",
        "KiB",
        "process RSS growth per client",
        "multiplexer heap per client (its own accounting)",
        Target::DiffAtMost(16.0),
    );
    let wanted: Vec<bool> = [&roundtrip, &events1, &events10, &memory]
        .iter()
        .map(|f| settings.wants(&f.id, &f.name))
        .collect();
    if !wanted.iter().any(|w| *w) {
        return Ok(Vec::new());
    }
    let mut qemu = SharedQemu::start(settings)?;
    let (rounds, per_round, pairs) = settings.pick((20, 100, 200), (3, 20, 30));
    let mut via = qemu.client()?;
    for _ in 0..per_round {
        roundtrip_once(&mut via)?;
        roundtrip_once(&mut qemu.direct)?;
    }
    if wanted[0] {
        for round in 0..rounds {
            let mut sides: [(bool, &mut Connection); 2] =
                [(true, &mut via), (false, &mut qemu.direct)];
            sides.rotate_left(round % 2);
            for (ours, conn) in sides {
                let (result, wall, used) = measure(Cpu::thread, || {
                    (0..per_round).try_for_each(|_| roundtrip_once(conn))
                });
                result?;
                let side = if ours {
                    &mut roundtrip.ours
                } else {
                    &mut roundtrip.baseline
                };
                side.push(us_per(wall, per_round), used, per_round);
            }
        }
        roundtrip.notes.push(format!(
            "{rounds} rounds of {per_round} round trips per side, QEMU -M none (tcg), oob negotiated; the owner's loop is one thread with one mio::Poll"
        ));
    }
    drop(via);
    for (want, figure, readers) in [(wanted[1], &mut events1, 1), (wanted[2], &mut events10, 10)] {
        if !want {
            continue;
        }
        let slow = readers == 10;
        qemu.event_burst(figure, readers, rounds.min(5), pairs, slow)?;
    }
    if wanted[3] {
        // Within the default limit of 64 clients at once.
        qemu.memory(&mut memory, settings.pick(60, 20), rounds.min(5))?;
    }
    let stats = qemu.finish()?;
    let mut figures = Vec::new();
    for (want, mut figure) in wanted
        .into_iter()
        .zip([roundtrip, events1, events10, memory])
    {
        if want {
            figure.notes.push(format!(
                "multiplexer totals: {} clients, {} commands forwarded, {} answered itself, {} overflowed",
                stats.clients_accepted,
                stats.commands_forwarded,
                stats.commands_answered,
                stats.clients_overflowed
            ));
            figures.push(figure);
        }
    }
    Ok(figures)
}

fn events_figure(readers: usize) -> Figure {
    Figure::new(
        format!("mux/events-{readers}"),
        format!(
            "QMP events to {readers} reading client(s) through the multiplexer (stop/cont burst)"
        ),
        "events/s",
        "slowest client via MuxServer",
        "client on a monitor directly",
        Target::RatioAtLeast(0.9),
    )
}

fn roundtrip_once(conn: &mut Connection) -> Result<(), String> {
    let status = conn
        .execute("query-status", None)
        .map_err(|e| format!("query-status: {e}"))?;
    if status.get("status").is_none() {
        return Err(format!("query-status returned {status}"));
    }
    Ok(())
}

/// A job for the owner's thread: runs with its multiplexer server.
type Job = Box<dyn FnOnce(&mut MuxServer) + Send>;

/// QEMU with one monitor shared by an owner thread and one monitor for a direct client.
struct SharedQemu {
    direct: Connection,
    path: PathBuf,
    jobs: mpsc::Sender<Option<Job>>,
    waker: std::sync::Arc<Waker>,
    owner: Option<JoinHandle<Result<qmp_client::MuxStats, String>>>,
    child: QemuChild,
}

const QMP: Token = Token(0);
const WAKE: Token = Token(1);
const SERVER: Token = Token(16);

impl SharedQemu {
    fn start(settings: &Settings) -> Result<SharedQemu, String> {
        let (child, ours) = spawn_monitors(settings, "qemu-mux.log", &["owner", "direct"])?;
        let mut ours = ours.into_iter();
        let (Some(owner), Some(direct)) = (ours.next(), ours.next()) else {
            return Err("two socketpairs expected".to_string());
        };
        let config = Config::default().with_greeting_timeout(Duration::from_secs(10));
        let handshake = |stream| {
            Connection::from_unix_stream(stream, &config)
                .map_err(|e| format!("handshake: {e}; qemu log: {}", child.log_tail()))
        };
        let mut owner = handshake(owner)?;
        let direct = handshake(direct)?;
        let mux = Mux::for_session(
            &mut owner.session_mut(),
            MuxConfig::default().with_max_queued_bytes(QUEUE_LIMIT),
        )
        .ok_or("the owner's session has no handshake")?;
        let mut server = MuxServer::bind(mux, &ShareAddress::default())
            .map_err(|e| format!("cannot share the monitor: {e}"))?;
        let path = server.path().to_owned();
        let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
        let waker = std::sync::Arc::new(
            Waker::new(poll.registry(), WAKE).map_err(|e| format!("waker: {e}"))?,
        );
        let raw = owner.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&raw), QMP, Interest::READABLE)
            .map_err(|e| format!("register: {e}"))?;
        server
            .register(poll.registry(), SERVER)
            .map_err(|e| format!("register: {e}"))?;
        let (jobs, inbox) = mpsc::channel::<Option<Job>>();
        let thread = std::thread::spawn(move || owner_loop(poll, owner, server, &inbox));
        Ok(SharedQemu {
            direct,
            path,
            jobs,
            waker,
            owner: Some(thread),
            child,
        })
    }

    /// A client of the multiplexer (our own `Connection`).
    fn client(&self) -> Result<Connection, String> {
        Connection::connect_unix(&self.path, &Config::default())
            .map_err(|e| format!("cannot attach to the multiplexer: {e}"))
    }

    /// Runs `job` on the owner's thread and returns its result.
    fn on_owner<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut MuxServer) -> T + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |server| {
            let _ = tx.send(job(server));
        });
        self.jobs
            .send(Some(job))
            .map_err(|_| "the owner's thread ended".to_string())?;
        self.waker.wake().map_err(|e| format!("wake: {e}"))?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the owner's thread did not answer".to_string())
    }

    /// `rounds` bursts of `pairs` stop/cont pairs from the direct client, each event awaited
    /// by `readers` clients of the multiplexer; with `slow`, a never-reading client too.
    fn event_burst(
        &mut self,
        figure: &mut Figure,
        readers: usize,
        rounds: usize,
        pairs: usize,
        slow: bool,
    ) -> Result<(), String> {
        let ops = 2 * pairs;
        let mut lost = 0u64;
        let mut clients = (0..readers)
            .map(|_| self.client())
            .collect::<Result<Vec<_>, _>>()?;
        for _ in 0..rounds {
            self.direct.clear_events();
            let start = Instant::now();
            let handles: Vec<_> = clients
                .drain(..)
                .map(|mut conn| {
                    std::thread::spawn(move || {
                        let filters = [EventFilter::new("STOP"), EventFilter::new("RESUME")];
                        let mut got = 0u64;
                        while got < ops as u64 {
                            match conn.wait_event(&filters, Duration::from_secs(30)) {
                                Ok(_) => got += 1,
                                Err(_) => break,
                            }
                        }
                        (conn, got, start.elapsed())
                    })
                })
                .collect();
            let direct_got = stop_cont_pairs(&mut self.direct, pairs)?;
            let direct_wall = start.elapsed();
            let mut slowest = Duration::ZERO;
            for handle in handles {
                let (conn, got, wall) = handle.join().map_err(|_| "reader panicked")?;
                lost += (ops as u64).abs_diff(got);
                slowest = slowest.max(wall);
                clients.push(conn);
            }
            figure
                .ours
                .push(per_second(ops, slowest), Cpu::default(), ops);
            figure
                .baseline
                .push(per_second(ops, direct_wall), Cpu::default(), ops);
            lost += (ops as u64).abs_diff(direct_got);
        }
        figure.check(
            format!("events missing or extra over {readers} reading client(s) and the direct one: {lost}"),
            lost == 0,
        );
        figure.notes.push(format!(
            "{rounds} bursts of {pairs} stop/cont pairs sent by the direct client, each awaited; {readers} reader thread(s)"
        ));
        // The readers stop reading now: close them, or they would overflow too.
        drop(clients);
        if slow {
            self.never_reader(figure)?;
        }
        Ok(())
    }

    /// A negotiated client that never reads, during stop/cont pairs from the direct client
    /// until the multiplexer drops it (at most 20,000 pairs): its queue stays bounded, the
    /// other clients carry on.
    fn never_reader(&mut self, figure: &mut Figure) -> Result<(), String> {
        let mut sleeper = negotiated_raw(&self.path)?;
        let mut pairs = 0;
        let mut peak = 0usize;
        let overflowed = |s: &mut MuxServer| s.stats().clients_overflowed;
        let before = self.on_owner(overflowed)?;
        let start = Instant::now();
        while self.on_owner(overflowed)? == before && pairs < 20_000 {
            for command in ["stop", "cont"] {
                self.direct
                    .execute(command, None)
                    .map_err(|e| format!("{command}: {e}"))?;
            }
            self.direct.clear_events();
            pairs += 1;
            if pairs % 50 == 0 {
                let held = self.on_owner(|s| {
                    let ids: Vec<_> = s.mux().clients().map(|c| c.id).collect();
                    ids.iter()
                        .map(|id| s.mux().client_memory(*id))
                        .max()
                        .unwrap_or(0)
                })?;
                peak = peak.max(held);
            }
        }
        let dropped = self.on_owner(overflowed)? > before;
        // Its connection ends after what its socket buffer holds.
        let mut rest = Vec::new();
        let ended = std::io::Read::read_to_end(&mut sleeper, &mut rest).is_ok();
        figure.check(
            format!(
                "a never-reading client: dropped {dropped} after {pairs} stop/cont pairs ({:.1} s), largest client heap seen {} KiB (queue limit {} KiB), {} KiB were in its socket, its connection ended: {ended}",
                start.elapsed().as_secs_f64(),
                peak / 1024,
                QUEUE_LIMIT / 1024,
                rest.len() / 1024
            ),
            dropped && ended && peak <= QUEUE_LIMIT + 64 * 1024,
        );
        Ok(())
    }

    /// RSS and the multiplexer's own heap accounting per idle negotiated client.
    fn memory(&self, figure: &mut Figure, count: usize, rounds: usize) -> Result<(), String> {
        for _ in 0..rounds {
            let before = rss_kib()?;
            let clients = (0..count)
                .map(|_| negotiated_raw(&self.path))
                .collect::<Result<Vec<_>, _>>()?;
            let heap = self.on_owner(|s| {
                let ids: Vec<_> = s.mux().clients().map(|c| c.id).collect();
                ids.iter()
                    .map(|id| s.mux().client_memory(*id))
                    .sum::<usize>()
            })?;
            let after = rss_kib()?;
            figure.ours.push(
                (after.saturating_sub(before)) as f64 / count as f64,
                Cpu::default(),
                count,
            );
            figure
                .baseline
                .push(heap as f64 / 1024.0 / count as f64, Cpu::default(), count);
            drop(clients);
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.on_owner(|s| s.mux().client_count())? > 0 {
                if Instant::now() > deadline {
                    return Err("clients not gone 10 s after closing".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        figure.notes.push(format!(
            "{count} raw clients attached and negotiated, then idle, per round; the target: RSS grows by at most 16 KiB per client beyond the queues and decoders the multiplexer accounts for"
        ));
        Ok(())
    }

    fn finish(mut self) -> Result<qmp_client::MuxStats, String> {
        let _ = self.jobs.send(None);
        let _ = self.waker.wake();
        let stats = match self.owner.take() {
            Some(thread) => thread.join().map_err(|_| "owner panicked")??,
            None => return Err("no owner".into()),
        };
        self.direct
            .execute("quit", None)
            .map_err(|e| format!("quit: {e}"))?;
        let status = self
            .child
            .wait_until(Instant::now() + Duration::from_secs(10))?;
        if !status.success() {
            return Err(format!(
                "QEMU exited with {status}: {}",
                self.child.log_tail()
            ));
        }
        Ok(stats)
    }
}

/// The owner's loop: one poll for its QMP socket, the multiplexer's sockets and a waker.
fn owner_loop(
    mut poll: Poll,
    mut conn: Connection,
    mut server: MuxServer,
    inbox: &mpsc::Receiver<Option<Job>>,
) -> Result<qmp_client::MuxStats, String> {
    let mut events = Events::with_capacity(256);
    loop {
        let timeout = if server.wants_pump(&conn.session()) || conn.wants_read() {
            Some(Duration::ZERO)
        } else {
            None
        };
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("poll: {e}"));
            }
        }
        for event in events.iter() {
            if server.owns(event.token()) {
                server.handle(poll.registry(), event);
            }
        }
        conn.process_io()
            .map_err(|e| format!("the owner's monitor failed: {e}"))?;
        server.pump(poll.registry(), &mut conn.session_mut());
        conn.process_io()
            .map_err(|e| format!("the owner's monitor failed: {e}"))?;
        loop {
            match inbox.try_recv() {
                Ok(Some(job)) => job(&mut server),
                Ok(None) | Err(mpsc::TryRecvError::Disconnected) => {
                    server.shutdown(poll.registry());
                    return Ok(server.stats());
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
    }
}

/// A raw client of the multiplexer that read its greeting and negotiated, and reads no more.
fn negotiated_raw(path: &std::path::Path) -> Result<UnixStream, String> {
    let stream = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    (&stream)
        .write_all(br#"{"execute":"qmp_capabilities"}"#)
        .map_err(|e| e.to_string())?;
    line.clear();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.contains("\"return\"") {
        return Err(format!("negotiation through the multiplexer: {line:?}"));
    }
    Ok(stream)
}

/// Our resident set size in KiB (`VmRSS` of /proc/self/status).
fn rss_kib() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no VmRSS in /proc/self/status".to_string())
}
