//! Figure "mux-chaos": many clients hammer the QMP multiplexer of a real QEMU (`-M none`, TCG,
//! shared with `MachineBuilder::share_qmp`) at once, while a client on a monitor of QEMU's own
//! runs a `stop`/`cont` event storm and the machine keeps using its monitor itself.
//!
//! - Steady clients send bursts of commands with ids reused across clients and within a burst,
//!   garbage lines and `quit` (refused) mixed in; every reply must be their own, in order.
//! - Other clients vanish mid-command, never read (they must be dropped, with bounded
//!   buffers), or connect and disconnect in a storm at every step of the handshake.
//! - Every live reader (and the machine itself) must see exactly the events QEMU sent to its
//!   own monitor, in order; the storm waits for the slowest reader (a window of
//!   [`WINDOW`] events), so a reader is never dropped for being merely slow.
//! - Round trips through the multiplexer beside the same command on a monitor of QEMU's own
//!   (the baseline), quiet and under the chaos, in the same run.
//! - At the end QEMU still answers on every path and quits gracefully; every client is gone
//!   from the multiplexer with its buffers, and nothing leaks (the harness's leak check, plus
//!   the socket files).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use machine_core::qmp_client::{MuxConfig, MuxStats, ShareAddress};
use machine_core::{EndedBy, Machine};
use serde_json::{json, Value};

use super::{chain, sys, Figure, Rng, Settings, Stats};
use crate::e2e::RawQmp;

/// Most events the storm may be ahead of the slowest reader: about 170 KB of events, well
/// under the multiplexer's 1 MiB queue limit, so only a client that stops reading overflows.
const WINDOW: u64 = 2000;

/// Schema requests a never-reading client sends (about 207 KB of reply each on QEMU 7.2).
const UNREAD_SCHEMAS: usize = 40;

/// How much of the work each size does.
struct Sizes {
    /// Steady clients (connected before the storm, reading everything until its end).
    steady: usize,
    /// Commands (garbage and `quit` included) each steady client sends.
    commands: usize,
    /// Clients that never read.
    never_readers: usize,
    /// Threads of clients that vanish mid-command, and clients each.
    vanishers: usize,
    vanish_each: usize,
    /// Threads of the connect/disconnect storm, and connections each.
    stormers: usize,
    storm_each: usize,
    /// Fewest `stop`/`cont` pairs of the event storm.
    min_pairs: usize,
    /// Round trips per side of the quiet latency baseline.
    quiet: usize,
    /// How long the whole chaos may take before it counts as a hang.
    deadline: Duration,
}

impl Sizes {
    fn of(settings: &Settings) -> Sizes {
        if settings.quick {
            Sizes {
                steady: 8,
                commands: 150,
                never_readers: 2,
                vanishers: 2,
                vanish_each: 15,
                stormers: 2,
                storm_each: 40,
                min_pairs: 300,
                quiet: 200,
                deadline: Duration::from_secs(40),
            }
        } else {
            Sizes {
                steady: 32,
                commands: 400,
                never_readers: 4,
                vanishers: 4,
                vanish_each: 100,
                stormers: 4,
                storm_each: 250,
                min_pairs: 5000,
                quiet: 1000,
                deadline: Duration::from_secs(240),
            }
        }
    }
}

/// The wall-clock bound of the figure (see `figure_deadline`).
pub fn deadline(settings: &Settings) -> Duration {
    Sizes::of(settings).deadline + Duration::from_secs(60)
}

/// One event as a reader saw it: name and QEMU's timestamp (the same on every monitor).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    name: String,
    seconds: i64,
    micros: i64,
}

/// A QMP peer that records the events it reads while waiting for replies.
struct Peer<'a> {
    qmp: RawQmp,
    events: Vec<Seen>,
    /// Counted up for each event, for the storm's flow control.
    seen: Option<&'a AtomicU64>,
}

impl<'a> Peer<'a> {
    /// Connects to `path`, reads the greeting and negotiates.
    fn connect(
        path: &Path,
        deadline: Instant,
        seen: Option<&'a AtomicU64>,
    ) -> Result<Self, String> {
        let mut qmp = raw(path)?;
        qmp.handshake(deadline)?;
        Ok(Peer {
            qmp,
            events: Vec::new(),
            seen,
        })
    }

    /// The next message: `None` for an event (recorded), else the message.
    fn read(&mut self, deadline: Instant) -> Result<Option<Value>, String> {
        let message = self.qmp.read_message(deadline)?;
        let Some(name) = message.get("event").and_then(Value::as_str) else {
            return Ok(Some(message));
        };
        let stamp = &message["timestamp"];
        self.events.push(Seen {
            name: name.to_owned(),
            seconds: stamp["seconds"].as_i64().unwrap_or(-1),
            micros: stamp["microseconds"].as_i64().unwrap_or(-1),
        });
        if let Some(seen) = self.seen {
            seen.fetch_add(1, Ordering::Relaxed);
        }
        Ok(None)
    }

    /// The next message that is not an event (events are recorded).
    fn reply(&mut self, deadline: Instant) -> Result<Value, String> {
        loop {
            if let Some(message) = self.read(deadline)? {
                return Ok(message);
            }
        }
    }

    /// Takes this reader out of the storm's flow control (it failed and reads no more).
    fn stop_counting(&self) {
        if let Some(seen) = self.seen {
            seen.store(u64::MAX, Ordering::Relaxed);
        }
    }

    /// Sends `command` and returns its reply and round-trip time.
    fn call(&mut self, command: &str, deadline: Instant) -> Result<(Value, Duration), String> {
        let started = Instant::now();
        self.qmp.send(command.as_bytes())?;
        let reply = self.reply(deadline)?;
        Ok((reply, started.elapsed()))
    }

    /// Reads until the event `name` has been seen; returns the replies read meanwhile (there
    /// should be none: nothing is outstanding).
    fn until_event(&mut self, name: &str, deadline: Instant) -> Result<Vec<Value>, String> {
        let mut stray = Vec::new();
        while !self.events.iter().any(|e| e.name == name) {
            stray.extend(self.read(deadline)?);
        }
        Ok(stray)
    }
}

fn raw(path: &Path) -> Result<RawQmp, String> {
    std::os::unix::net::UnixStream::connect(path)
        .map(RawQmp::new)
        .map_err(|e| format!("connect {}: {e}", path.display()))
}

/// What a steady client expects as the reply to one thing it sent.
#[derive(Debug, Clone)]
enum Expect {
    Status,
    Version,
    Name,
    /// `qom-get` on a path nobody else uses: QEMU's `DeviceNotFound` names it.
    NotFound(String),
    QuitRefused,
    /// An id-less `GenericError` about the JSON.
    Garbage,
}

#[derive(Debug, Clone)]
struct Expected {
    what: Expect,
    id: Option<Value>,
}

impl Expected {
    fn matches(&self, reply: &Value) -> bool {
        if reply.get("id") != self.id.as_ref() {
            return false;
        }
        let error = |class: &str| reply["error"]["class"] == class;
        let desc = reply["error"]["desc"].as_str().unwrap_or_default();
        match &self.what {
            Expect::Status => {
                reply["return"]["status"].is_string() && reply["return"]["running"].is_boolean()
            }
            Expect::Version => reply["return"]["qemu"]["major"].is_u64(),
            Expect::Name => reply["return"].is_object() && reply.get("error").is_none(),
            Expect::NotFound(path) => {
                error("DeviceNotFound") && desc.contains(&format!("'{path}'"))
            }
            Expect::QuitRefused => error("GenericError") && desc.contains("quit is refused"),
            Expect::Garbage => {
                error("GenericError")
                    && (desc.starts_with("JSON parse error")
                        || desc == "QMP input must be a JSON object")
            }
        }
    }
}

/// Lines QEMU answers with exactly one id-less error each.
const GARBAGE: [&str; 4] = ["garbage\n", "{\"execute\":}\n", "[1,2]\n", "42\n"];

/// One random thing for steady client `client` to send as its `seq`th, and what must come back.
fn next_command(client: usize, seq: usize, rng: &mut Rng) -> (String, Expected) {
    let id = match rng.below(6) {
        0 => Some(json!(1)),
        1 => Some(json!(2)),
        2 => Some(json!("x")),
        3 => Some(json!({"c": [1, null]})),
        4 => Some(json!(seq % 3)),
        _ => None,
    };
    let (execute, arguments, what) = match rng.below(40) {
        0..=13 => {
            let path = format!("/chaos/c{client}/n{seq}");
            let args = json!({"path": path, "property": "x"});
            ("qom-get", Some(args), Expect::NotFound(path))
        }
        14..=22 => ("query-status", None, Expect::Status),
        23..=29 => ("query-version", None, Expect::Version),
        30..=35 => ("query-name", None, Expect::Name),
        36 => ("quit", None, Expect::QuitRefused),
        _ => {
            let line = GARBAGE[rng.below(GARBAGE.len() as u64) as usize];
            let what = Expected {
                what: Expect::Garbage,
                id: None,
            };
            return (line.to_owned(), what);
        }
    };
    let mut command = json!({ "execute": execute });
    if let Some(arguments) = arguments {
        command["arguments"] = arguments;
    }
    if let Some(id) = &id {
        command["id"] = id.clone();
    }
    (command.to_string(), Expected { what, id })
}

/// What the threads share.
struct Shared {
    /// Events seen by each live reader (the steady clients, then the prober's client).
    seen: Vec<AtomicU64>,
    /// Workers not finished yet (steady clients until their commands are answered, vanishers,
    /// stormers, never-readers); the storm goes on while any is.
    working: AtomicUsize,
    /// The storm driver has finished (its sentinel `RESET` is out, or it failed).
    storm_over: AtomicBool,
    /// Clients the multiplexer dropped for not reading, as the owner last saw it.
    overflowed: AtomicU64,
    deadline: Instant,
}

/// Counts a worker as finished when dropped (also when it returned early with an error).
struct Finished<'a>(&'a AtomicUsize);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct SteadyResult {
    sent: usize,
    correct: usize,
    /// Replies that were not the one expected next (another client's, or out of order).
    wrong: usize,
    /// The first few of them, described.
    examples: Vec<String>,
    quits_refused: usize,
    garbage_answered: usize,
    events: Vec<Seen>,
    error: Option<String>,
}

fn steady(
    client: usize,
    mut peer: Peer<'_>,
    seed: u64,
    commands: usize,
    shared: &Shared,
) -> SteadyResult {
    let mut result = SteadyResult::default();
    let mut rng = Rng::new(seed);
    let work = {
        let _finished = Finished(&shared.working);
        steady_work(
            client,
            &mut peer,
            &mut rng,
            commands,
            shared.deadline,
            &mut result,
        )
    };
    let tail = work.and_then(|()| peer.until_event("RESET", shared.deadline));
    match tail {
        Ok(stray) => {
            for reply in stray {
                result.wrong += 1;
                result
                    .examples
                    .push(format!("client {client}: unasked-for {reply}"));
            }
        }
        Err(e) => {
            result.error = Some(format!("steady client {client}: {e}"));
            peer.stop_counting();
        }
    }
    result.events = peer.events;
    result
}

fn steady_work(
    client: usize,
    peer: &mut Peer<'_>,
    rng: &mut Rng,
    commands: usize,
    deadline: Instant,
    result: &mut SteadyResult,
) -> Result<(), String> {
    while result.sent < commands {
        let burst = (1 + rng.below(4) as usize).min(commands - result.sent);
        let mut text = String::new();
        let mut expected = Vec::with_capacity(burst);
        for _ in 0..burst {
            let (line, what) = next_command(client, result.sent, rng);
            text.push_str(&line);
            expected.push(what);
            result.sent += 1;
        }
        peer.qmp.send(text.as_bytes())?;
        let n = expected.len();
        for (k, what) in expected.into_iter().enumerate() {
            let reply = peer
                .reply(deadline)
                .map_err(|e| format!("{e} (reply {k} of {n} to {text:?})"))?;
            if what.matches(&reply) {
                result.correct += 1;
                match what.what {
                    Expect::QuitRefused => result.quits_refused += 1,
                    Expect::Garbage => result.garbage_answered += 1,
                    _ => {}
                }
            } else {
                result.wrong += 1;
                if result.examples.len() < 3 {
                    let mut got = reply.to_string();
                    got.truncate(160);
                    result.examples.push(format!(
                        "client {client}: expected {:?} id {:?}, got {got}",
                        what.what, what.id
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The event storm on a monitor of QEMU's own: `stop`/`cont` pairs while any worker is busy
/// (and at least `min_pairs`), never more than [`WINDOW`] events ahead of the slowest reader;
/// then `system_reset`, whose `RESET` tells every reader that the storm is over.
fn storm(
    mut peer: Peer<'_>,
    min_pairs: usize,
    shared: &Shared,
) -> (usize, Vec<Seen>, Option<String>) {
    let mut pairs = 0;
    let outcome = (|| -> Result<(), String> {
        while shared.working.load(Ordering::SeqCst) > 0 || pairs < min_pairs {
            loop {
                let emitted = peer.events.len() as u64;
                let slowest = shared
                    .seen
                    .iter()
                    .map(|s| s.load(Ordering::Relaxed))
                    .min()
                    .unwrap_or(emitted);
                if emitted.saturating_sub(slowest) <= WINDOW {
                    break;
                }
                if Instant::now() > shared.deadline {
                    return Err(format!(
                        "a reader stopped reading: {emitted} events emitted, the slowest saw {slowest}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            for command in [r#"{"execute":"stop"}"#, r#"{"execute":"cont"}"#] {
                let (reply, _) = peer.call(command, shared.deadline)?;
                if reply.get("return").is_none() {
                    return Err(format!("{command}: {reply}"));
                }
            }
            pairs += 1;
        }
        Ok(())
    })();
    // The sentinel goes out even after a failure, so that no reader waits for it in vain.
    let sentinel = peer
        .call(r#"{"execute":"system_reset"}"#, shared.deadline)
        .and_then(|_| peer.until_event("RESET", shared.deadline).map(drop));
    shared.storm_over.store(true, Ordering::SeqCst);
    let error = outcome.and(sentinel).err().map(|e| format!("storm: {e}"));
    (pairs, peer.events, error)
}

#[derive(Debug, Default)]
struct ProbeResult {
    direct: Vec<Duration>,
    mux: Vec<Duration>,
    events: Vec<Seen>,
    error: Option<String>,
}

const QUERY_STATUS: &str = r#"{"execute":"query-status"}"#;

/// `query-status` on a monitor of QEMU's own and through the multiplexer, alternately, until
/// the storm is over; then the mux client waits for the storm's `RESET` like every reader.
fn probe<'a>(mut direct: Peer<'a>, mut via: Peer<'a>, shared: &Shared) -> ProbeResult {
    let mut result = ProbeResult::default();
    let outcome = (|| -> Result<(), String> {
        while !shared.storm_over.load(Ordering::SeqCst) {
            for (side, peer) in [(0, &mut direct), (1, &mut via)] {
                let (reply, took) = peer.call(QUERY_STATUS, shared.deadline)?;
                if !reply["return"]["status"].is_string() {
                    return Err(format!("query-status: {reply}"));
                }
                if side == 0 {
                    result.direct.push(took);
                } else {
                    result.mux.push(took);
                }
            }
        }
        let stray = via.until_event("RESET", shared.deadline)?;
        if !stray.is_empty() {
            return Err(format!("unasked-for replies: {stray:?}"));
        }
        Ok(())
    })();
    result.error = outcome.err().map(|e| format!("prober: {e}"));
    if result.error.is_some() {
        via.stop_counting();
    }
    result.events = via.events;
    result
}

/// A client that negotiates, asks for many schemas and never reads: the multiplexer must drop
/// it (its queue would pass the limit) and close its socket.
fn never_reader(path: &Path, count: u64, shared: &Shared) -> Result<(), String> {
    let _finished = Finished(&shared.working);
    let mut qmp = raw(path)?;
    qmp.handshake(shared.deadline)?;
    qmp.send(r#"{"execute":"query-qmp-schema"}"#.repeat(UNREAD_SCHEMAS).as_bytes())?;
    // The owner publishes the multiplexer's count of clients dropped for not reading.
    while shared.overflowed.load(Ordering::SeqCst) < count {
        if Instant::now() > shared.deadline {
            return Err(format!(
                "never-reading clients not dropped: {} of {count}",
                shared.overflowed.load(Ordering::SeqCst)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Dropped: what was written before is still readable, then the socket ends.
    qmp.read_to_eof(shared.deadline)
        .map(drop)
        .map_err(|e| format!("a dropped never-reader's socket did not end: {e}"))
}

#[derive(Debug, Default)]
struct WorkerTally {
    connections: usize,
    /// Clients refused for being past the multiplexer's client limit.
    refused: usize,
    /// Commands sent whose replies were never read.
    abandoned: usize,
}

fn is_refusal(e: &str) -> bool {
    e.contains("too many clients")
}

/// Clients that negotiate, send one to six commands (the last sometimes cut in half), read
/// some of the replies and vanish.
fn vanisher(path: &Path, seed: u64, each: usize, shared: &Shared) -> Result<WorkerTally, String> {
    let _finished = Finished(&shared.working);
    let mut rng = Rng::new(seed);
    let mut tally = WorkerTally::default();
    for round in 0..each {
        let mut qmp = raw(path)?;
        tally.connections += 1;
        match qmp.handshake(shared.deadline) {
            Ok(()) => {}
            Err(e) if is_refusal(&e) => {
                tally.refused += 1;
                continue;
            }
            Err(e) => return Err(format!("vanisher handshake: {e}")),
        }
        let n = 1 + rng.below(6) as usize;
        let mut text = String::new();
        for k in 0..n {
            let command = match (k, rng.below(3)) {
                // At most two schemas (about 400 KB): a vanishing client must not overflow.
                (0 | 1, 0) => r#"{"execute":"query-qmp-schema","id":1}"#.to_owned(),
                (_, 1) => r#"{"execute":"query-status","id":1}"#.to_owned(),
                _ => json!({"execute": "qom-get", "id": 1,
                    "arguments": {"path": format!("/vanish/{seed}/{round}/{k}"), "property": "x"}})
                .to_string(),
            };
            text.push_str(&command);
        }
        if rng.below(3) == 0 {
            text.truncate(text.len() - 5);
        }
        qmp.send(text.as_bytes())?;
        // Some replies are read (events are skipped), the rest are left behind.
        let read = rng.below(n as u64) as usize;
        let mut replies = 0;
        while replies < read {
            let message = qmp.read_message(shared.deadline)?;
            replies += usize::from(message.get("event").is_none());
        }
        tally.abandoned += n - read;
    }
    Ok(tally)
}

/// Connections that end at every step: at once, after the greeting, after negotiating, in
/// the middle of a command, or after garbage before negotiating.
fn stormer(path: &Path, seed: u64, each: usize, shared: &Shared) -> Result<WorkerTally, String> {
    let _finished = Finished(&shared.working);
    let mut rng = Rng::new(seed);
    let mut tally = WorkerTally::default();
    for _ in 0..each {
        let mut qmp = raw(path)?;
        tally.connections += 1;
        let step = rng.below(5);
        let outcome = match step {
            0 => Ok(()),
            1 => qmp.read_message(shared.deadline).map(drop),
            2 => qmp.handshake(shared.deadline),
            3 => qmp
                .handshake(shared.deadline)
                .and_then(|()| qmp.send(br#"{"execute":"query-sta"#)),
            _ => qmp.send(b"garbage\n{\"execute\":\"query-status\"}"),
        };
        match outcome {
            Ok(()) => {}
            Err(e) if is_refusal(&e) => tally.refused += 1,
            Err(e) => return Err(format!("storm connection (step {step}): {e}")),
        }
    }
    Ok(tally)
}

/// The three socket paths: two monitors of QEMU's own and the multiplexer's.
struct Paths {
    driver: PathBuf,
    prober: PathBuf,
    mux: PathBuf,
}

/// Runs the figure.
pub fn run(settings: &Settings) -> Figure {
    let mut figure = Figure::new("mux-chaos");
    let dir = settings.scratch().join("mux-chaos");
    let paths = Paths {
        driver: dir.join("direct1.sock"),
        prober: dir.join("direct2.sock"),
        mux: dir.join("mux.sock"),
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        figure.check("scratch directory", "created", e.to_string(), false);
        return figure;
    }
    let mut builder = settings.none_machine();
    for path in [&paths.driver, &paths.prober] {
        builder.args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", path.display()),
        ]);
    }
    builder.share_qmp(ShareAddress::unix(&paths.mux), MuxConfig::default());
    let mut vm = builder.build();
    if let Err(e) = vm.launch() {
        figure.check(
            "QEMU launched with a shared monitor",
            "yes",
            chain(&e),
            false,
        );
        return figure;
    }
    if let Err(e) = chaos(settings, &mut vm, &paths, &mut figure) {
        figure.check("the figure ran to its end", "yes", e, false);
    }
    match vm.shutdown() {
        Ok(report) => figure.check(
            "QEMU quit gracefully at the end",
            "quit, clean",
            report.summary(),
            report.ended_by == EndedBy::Quit && report.clean(),
        ),
        Err(e) => figure.check(
            "QEMU quit gracefully at the end",
            "quit, clean",
            chain(&e),
            false,
        ),
    }
    drop(vm);
    let left: Vec<String> = [&paths.driver, &paths.prober, &paths.mux]
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    figure.check(
        "socket files left (the multiplexer's and QEMU's two)",
        "0",
        format!("{} {left:?}", left.len()),
        left.is_empty(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    figure
}

/// The quiet baseline, the chaos, and the checks on what came out of it.
fn chaos(
    settings: &Settings,
    vm: &mut Machine,
    paths: &Paths,
    figure: &mut Figure,
) -> Result<(), String> {
    let sizes = Sizes::of(settings);
    let deadline = Instant::now() + sizes.deadline;
    let stats = |vm: &Machine| {
        vm.sharing_stats()
            .ok_or("the machine's monitor is not shared")
    };
    let accepted_before = stats(vm)?.clients_accepted;
    let mut expected_connections = 0usize;

    // Quiet baseline: the same command through the multiplexer and on QEMU's own monitor,
    // alternately, before any chaos.
    let mut direct = Peer::connect(&paths.prober, deadline, None)?;
    let mut quiet = (Vec::new(), Vec::new());
    {
        let mut via = Peer::connect(&paths.mux, deadline, None)?;
        expected_connections += 1;
        for _ in 0..sizes.quiet {
            quiet.0.push(direct.call(QUERY_STATUS, deadline)?.1);
            quiet.1.push(via.call(QUERY_STATUS, deadline)?.1);
        }
    }
    let quiet = (Stats::of(&quiet.0), Stats::of(&quiet.1));

    let shared = Shared {
        seen: (0..=sizes.steady).map(|_| AtomicU64::new(0)).collect(),
        working: AtomicUsize::new(
            sizes.steady + sizes.never_readers + sizes.vanishers + sizes.stormers,
        ),
        storm_over: AtomicBool::new(false),
        overflowed: AtomicU64::new(0),
        deadline,
    };
    let overflowed_before = stats(vm)?.clients_overflowed;
    // Every reader is negotiated before the storm starts, so each must see all of it.
    let mut steady_peers = Vec::new();
    for i in 0..sizes.steady {
        steady_peers.push(Peer::connect(&paths.mux, deadline, Some(&shared.seen[i]))?);
    }
    let probe_via = Peer::connect(&paths.mux, deadline, Some(&shared.seen[sizes.steady]))?;
    expected_connections += sizes.steady + 1;
    expected_connections += sizes.never_readers
        + sizes.vanishers * sizes.vanish_each
        + sizes.stormers * sizes.storm_each;
    let driver = Peer::connect(&paths.driver, deadline, None)?;
    direct.events.clear();
    vm.events();

    sys::trim_heap();
    sys::reset_peak_rss();
    let rss_before = sys::rss_bytes();
    let buffered_before = stats(vm)?.buffered_bytes;
    let mut peak = MuxStats::default();
    let mut owner_calls = Vec::new();
    let mut owner_errors = Vec::new();
    let mut owner_events = Vec::new();
    let seed = settings.seed;
    let started = Instant::now();
    let (steady_results, storm_result, probe_result, never_results, worker_results) =
        std::thread::scope(|scope| {
            let shared = &shared;
            let steadies: Vec<_> = steady_peers
                .into_iter()
                .enumerate()
                .map(|(i, peer)| {
                    let seed = seed ^ (0x5eed_0000 + i as u64);
                    scope.spawn(move || steady(i, peer, seed, sizes.commands, shared))
                })
                .collect();
            let never: Vec<_> = (0..sizes.never_readers)
                .map(|_| {
                    let count = sizes.never_readers as u64;
                    scope.spawn(move || never_reader(&paths.mux, count, shared))
                })
                .collect();
            let mut workers: Vec<_> = (0..sizes.vanishers)
                .map(|i| {
                    let seed = seed ^ (0xa0a0_0000 + i as u64);
                    scope.spawn(move || vanisher(&paths.mux, seed, sizes.vanish_each, shared))
                })
                .collect();
            workers.extend((0..sizes.stormers).map(|i| {
                let seed = seed ^ (0x5707_0000 + i as u64);
                scope.spawn(move || stormer(&paths.mux, seed, sizes.storm_each, shared))
            }));
            let prober = scope.spawn(move || probe(direct, probe_via, shared));
            let driver = scope.spawn(move || storm(driver, sizes.min_pairs, shared));

            // The owner keeps using its monitor meanwhile, and watches the multiplexer.
            while !shared.storm_over.load(Ordering::SeqCst)
                || shared.working.load(Ordering::SeqCst) > 0
            {
                let t = Instant::now();
                match vm.qmp("query-status", ()) {
                    Ok(_) => owner_calls.push(t.elapsed()),
                    Err(e) => owner_errors.push(chain(&e)),
                }
                owner_events.extend(vm.events());
                if let Some(s) = vm.sharing_stats() {
                    shared
                        .overflowed
                        .store(s.clients_overflowed - overflowed_before, Ordering::SeqCst);
                    peak.clients = peak.clients.max(s.clients);
                    peak.buffered_bytes = peak.buffered_bytes.max(s.buffered_bytes);
                }
                if Instant::now() > deadline + Duration::from_secs(5) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let join = |e: Box<dyn std::any::Any + Send>| format!("a chaos thread panicked: {e:?}");
            (
                steadies
                    .into_iter()
                    .map(|h| h.join().map_err(join))
                    .collect::<Vec<_>>(),
                driver.join().map_err(join),
                prober.join().map_err(join),
                never
                    .into_iter()
                    .map(|h| h.join().map_err(join))
                    .collect::<Vec<_>>(),
                workers
                    .into_iter()
                    .map(|h| h.join().map_err(join))
                    .collect::<Vec<_>>(),
            )
        });
    let chaos_time = started.elapsed();
    let mut errors: Vec<String> = owner_errors.iter().map(|e| format!("owner: {e}")).collect();

    // The owner's RESET is on its socket before this reply.
    match vm.qmp("query-status", ()) {
        Ok(_) => owner_events.extend(vm.events()),
        Err(e) => errors.push(format!("owner after the storm: {}", chain(&e))),
    }

    // Replies: every steady client's own, in order.
    let (pairs, emitted, storm_error) = storm_result?;
    errors.extend(storm_error);
    let mut sent = 0;
    let mut correct = 0;
    let mut wrong = 0;
    let mut examples = Vec::new();
    let mut quits = 0;
    let mut garbage = 0;
    let mut readers: Vec<(String, Vec<Seen>)> = Vec::new();
    for (i, result) in steady_results.into_iter().enumerate() {
        let r = result?;
        sent += r.sent;
        correct += r.correct;
        quits += r.quits_refused;
        garbage += r.garbage_answered;
        wrong += r.wrong;
        examples.extend(r.examples);
        errors.extend(r.error);
        readers.push((format!("steady client {i}"), r.events));
    }
    let probe_result = probe_result?;
    errors.extend(probe_result.error.clone());
    readers.push((
        "the prober's client".to_owned(),
        probe_result.events.clone(),
    ));
    figure.check(
        "steady clients' calls answered correctly (ids reused, garbage and quit mixed in)",
        "100 %",
        format!(
            "{correct}/{sent} ({quits} quit refused, {garbage} garbage lines answered, {} clients)",
            sizes.steady
        ),
        correct == sent && sent == sizes.steady * sizes.commands,
    );
    examples.truncate(3);
    figure.check(
        "replies delivered to the wrong client or out of order",
        "0",
        format!("{wrong} {examples:?}"),
        wrong == 0,
    );

    // Events: every live reader, and the owner, saw exactly what QEMU sent its own monitor.
    let owner_seen: Vec<Seen> = owner_events
        .iter()
        .filter(|e| matches!(e.event.as_str(), "STOP" | "RESUME" | "RESET"))
        .map(|e| Seen {
            name: e.event.clone(),
            seconds: e.timestamp.seconds,
            micros: e.timestamp.microseconds,
        })
        .collect();
    readers.push(("the machine (owner)".to_owned(), owner_seen));
    let counts: Vec<usize> = readers.iter().map(|(_, e)| e.len()).collect();
    let differing: Vec<String> = readers
        .iter()
        .filter(|(_, e)| *e != emitted)
        .map(|(who, e)| format!("{who}: {} events", e.len()))
        .take(3)
        .collect();
    figure.check(
        "events seen by every live reader (and the owner) = emitted, same order",
        format!("{} x {}", readers.len(), emitted.len()),
        format!(
            "min {} max {} of {} ({pairs} stop/cont pairs + RESET); {} differ {differing:?}",
            counts.iter().min().copied().unwrap_or(0),
            counts.iter().max().copied().unwrap_or(0),
            emitted.len(),
            differing.len()
        ),
        differing.is_empty() && emitted.len() == 2 * pairs + 1 && pairs >= sizes.min_pairs,
    );

    // Never-readers: dropped, their sockets closed.
    let never_ok = never_results
        .into_iter()
        .map(|r| r.and_then(|inner| inner))
        .filter(|r| match r {
            Ok(()) => true,
            Err(e) => {
                errors.push(e.clone());
                false
            }
        })
        .count();
    let after = stats(vm)?;
    let overflowed = after.clients_overflowed - overflowed_before;
    figure.check(
        "never-reading clients dropped (socket closed), and no other client",
        format!("{0}/{0}, {0} dropped", sizes.never_readers),
        format!("{never_ok}/{}, {overflowed} dropped", sizes.never_readers),
        never_ok == sizes.never_readers && overflowed == sizes.never_readers as u64,
    );

    // The other workers.
    let mut tally = WorkerTally::default();
    for result in worker_results {
        match result.and_then(|inner| inner) {
            Ok(t) => {
                tally.connections += t.connections;
                tally.refused += t.refused;
                tally.abandoned += t.abandoned;
            }
            Err(e) => errors.push(e),
        }
    }

    // QEMU still answers on every path.
    let end = Instant::now() + Duration::from_secs(10);
    let mut answering = Vec::new();
    for (what, path) in [
        ("QEMU's own monitor", &paths.driver),
        ("the multiplexer", &paths.mux),
    ] {
        let outcome = Peer::connect(path, end, None)
            .and_then(|mut peer| peer.call(QUERY_STATUS, end))
            .map(|(reply, _)| reply["return"]["status"] == "running");
        answering.push((what, outcome));
    }
    expected_connections += 1;
    answering.push((
        "the owner",
        vm.qmp("query-status", ())
            .map(|r| r["return"]["status"] == "running")
            .map_err(|e| chain(&e)),
    ));
    let not_answering: Vec<String> = answering
        .iter()
        .filter(|(_, r)| !matches!(r, Ok(true)))
        .map(|(what, r)| format!("{what}: {r:?}"))
        .collect();
    figure.check(
        "QEMU still running and answering at the end (own monitor, multiplexer, owner)",
        "3/3",
        format!("{}/3 {not_answering:?}", 3 - not_answering.len()),
        not_answering.is_empty(),
    );

    // Every client gone from the multiplexer, with its buffers; no connection lost.
    let settle = Instant::now() + Duration::from_secs(5);
    let mut last = stats(vm)?;
    while (last.clients > 0
        || last.clients_accepted - accepted_before < expected_connections as u64)
        && Instant::now() < settle
    {
        std::thread::sleep(Duration::from_millis(5));
        last = stats(vm)?;
    }
    let accepted = last.clients_accepted - accepted_before;
    figure.check(
        "connections accepted by the multiplexer = made",
        format!("{expected_connections}"),
        format!(
            "{accepted} ({} storm/vanish connections, {} refused as too many, {} commands abandoned by vanishing clients, {} late replies dropped)",
            tally.connections,
            tally.refused,
            tally.abandoned,
            last.late_replies_dropped
        ),
        accepted == expected_connections as u64,
    );
    sys::trim_heap();
    let rss_after = sys::rss_bytes();
    let rss_peak = sys::peak_rss_bytes();
    // Per client at most twice (allocation growth) the queue limit plus one message (the
    // largest here: a schema of about 207 KB) and its input buffer (our inputs are small).
    let limit = MuxConfig::default().max_queued_bytes as u64;
    let bound = peak.clients.max(1) * (2 * (limit + 256 * 1024) + 64 * 1024);
    figure.check(
        "multiplexer buffers: before / peak (sampled) / after every client left",
        format!("peak <= {} KiB, after 0", bound / 1024),
        format!(
            "{} KiB / {} KiB / {} KiB (peak {} clients); our RSS, harness included: {:.1} / {:.1} / {:.1} MiB",
            buffered_before / 1024,
            peak.buffered_bytes / 1024,
            last.buffered_bytes / 1024,
            peak.clients,
            rss_before as f64 / 1048576.0,
            rss_peak as f64 / 1048576.0,
            rss_after as f64 / 1048576.0
        ),
        peak.buffered_bytes <= bound && last.buffered_bytes == 0 && last.clients == 0,
    );

    // Latency through the multiplexer beside QEMU's own monitor, quiet and under the chaos.
    let chaos_direct = Stats::of(&probe_result.direct);
    let chaos_mux = Stats::of(&probe_result.mux);
    let owner = Stats::of(&owner_calls);
    figure.check(
        "query-status round trip, quiet: multiplexer (direct monitor)",
        "p50 <= direct + 1 ms",
        format!(
            "p50 {:.3} ms ({:.3}), p99 {:.3} ms ({:.3}), n={}",
            quiet.1.median_ms, quiet.0.median_ms, quiet.1.p99_ms, quiet.0.p99_ms, quiet.1.n
        ),
        quiet.1.n > 0 && quiet.1.median_ms <= quiet.0.median_ms + 1.0,
    );
    // Through the multiplexer a command waits for the shared monitor's queue, where QEMU
    // answers one request after the other: the never-readers' schemas (about 25 ms each on
    // QEMU 7.2, at most 8 per never-reader and 2 per vanishing client waiting) come first. The
    // direct monitor has a queue of its own. So this checks that nobody starves (5 s: several
    // times the worst queue of the full run, for a loaded machine), and shows the cost of
    // sharing beside the baseline.
    figure.check(
        "query-status round trip under the chaos: multiplexer (direct monitor)",
        "max < 5 s",
        format!(
            "p50 {:.2} ms ({:.2}), p99 {:.2} ms ({:.2}), max {:.1} ms, n={}; owner p50 {:.2} p99 {:.2} ms",
            chaos_mux.median_ms,
            chaos_direct.median_ms,
            chaos_mux.p99_ms,
            chaos_direct.p99_ms,
            chaos_mux.max_ms,
            chaos_mux.n,
            owner.median_ms,
            owner.p99_ms
        ),
        chaos_mux.n > 0 && owner.n > 0 && chaos_mux.max_ms.max(owner.max_ms) < 5000.0,
    );
    figure.check(
        "errors (timeouts, broken sockets, owner failures)",
        "0",
        format!(
            "{} {:?}",
            errors.len(),
            errors.iter().take(3).collect::<Vec<_>>()
        ),
        errors.is_empty(),
    );
    figure.detail("quiet_direct", quiet.0.to_json());
    figure.detail("quiet_mux", quiet.1.to_json());
    figure.detail("chaos_direct", chaos_direct.to_json());
    figure.detail("chaos_mux", chaos_mux.to_json());
    figure.detail("owner", owner.to_json());
    figure.detail("events_emitted", json!(emitted.len()));
    figure.detail(
        "calls",
        json!({"sent": sent, "correct": correct, "wrong": wrong}),
    );
    figure.detail(
        "memory",
        json!({"buffered_before": buffered_before, "buffered_peak": peak.buffered_bytes,
            "buffered_after": last.buffered_bytes, "rss_before": rss_before,
            "rss_peak": rss_peak, "rss_after": rss_after}),
    );
    figure.detail("mux_stats", json!(format!("{last:?}")));
    figure.note(format!(
        "{} steady clients x {} commands, {} never-readers, {} vanishing and {} storm connections, {pairs} stop/cont pairs, in {chaos_time:.1?}",
        sizes.steady,
        sizes.commands,
        sizes.never_readers,
        sizes.vanishers * sizes.vanish_each,
        sizes.stormers * sizes.storm_each,
    ));
    Ok(())
}
