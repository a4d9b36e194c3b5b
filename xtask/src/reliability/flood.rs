//! Figures "event flood" and "max message", measured against the scripted fake QMP server
//! (`qmp_client::testing`).
//!
//! The fake server runs in a child process (this binary with [`SERVE_FLAG`]), listening on a
//! unix socket in the run's scratch directory: the 100 MB of queued events or the 10 MiB
//! reply it holds would otherwise sit in our own memory and hide what the client itself
//! allocates. Peak memory is read from `VmHWM` after resetting it through
//! `/proc/self/clear_refs`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qmp_client::testing::{Action, Script};
use qmp_client::{Config, Connection};
use serde_json::{json, Value};

use super::{chain, sys, Figure, Settings, Stats};

/// The internal argument that turns this process into the fake server.
pub const SERVE_FLAG: &str = "--serve-fake";

/// Events sent before the reply.
const FLOOD_EVENTS: usize = 100_000;
/// Bytes of each event on the wire (CRLF included).
const EVENT_BYTES: usize = 1024;
/// The reply deadline of the flooded command (a reply later than this is a miss anyway).
const FLOOD_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server process may live.
const SERVER_LIFETIME: Duration = Duration::from_secs(120);

/// One event of exactly `EVENT_BYTES` bytes on the wire, CRLF included.
fn event_bytes(index: usize) -> Vec<u8> {
    let head = format!(
        "{{\"event\": \"FLOOD\", \"timestamp\": {{\"seconds\": 1700000000, \"microseconds\": {}}}, \"data\": {{\"n\": {index}, \"pad\": \"",
        index % 1_000_000
    );
    let tail = "\"}}\r\n";
    let pad = EVENT_BYTES.saturating_sub(head.len() + tail.len());
    let mut out = Vec::with_capacity(EVENT_BYTES);
    out.extend_from_slice(head.as_bytes());
    out.resize(out.len() + pad, b'p');
    out.extend_from_slice(tail.as_bytes());
    out
}

/// A reply of exactly `size` bytes (without the CRLF) echoing `id`.
fn reply_of_size(id: Option<&Value>, size: usize) -> Vec<u8> {
    let id = id.map(Value::to_string).unwrap_or_else(|| "null".into());
    let head = "{\"return\": {\"data\": \"";
    let tail = format!("\"}}, \"id\": {id}}}");
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut out = Vec::with_capacity(size + 2);
    out.extend_from_slice(head.as_bytes());
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(tail.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

/// The fake server process: `--serve-fake flood PATH N` or `--serve-fake big PATH SIZE`.
/// Serves one client, then exits (or after [`SERVER_LIFETIME`]).
pub fn serve(args: &[String]) -> Result<(), String> {
    let [kind, path, number] = args else {
        return Err(format!("usage: {SERVE_FLAG} flood|big PATH N"));
    };
    let number: usize = number
        .parse()
        .map_err(|_| format!("{SERVE_FLAG}: not a number: {number}"))?;
    let script = match kind.as_str() {
        "flood" => {
            // Built before listening: the reply latency must not include building it.
            let mut chunks: Vec<Action> = Vec::new();
            let mut chunk = Vec::with_capacity(1024 * EVENT_BYTES);
            for i in 0..number {
                chunk.extend_from_slice(&event_bytes(i));
                if chunk.len() >= 1024 * EVENT_BYTES {
                    chunks.push(Action::Raw(std::mem::take(&mut chunk)));
                }
            }
            if !chunk.is_empty() {
                chunks.push(Action::Raw(chunk));
            }
            chunks.push(Action::reply(json!({"status": "running", "running": true})));
            let mut once = Some(chunks);
            Script::new().on_fn("query-status", move |_| once.take().unwrap_or_default())
        }
        "big" => Script::new().on_fn("query-big", move |cmd| {
            vec![Action::Raw(reply_of_size(cmd.id.as_ref(), number))]
        }),
        other => return Err(format!("{SERVE_FLAG}: unknown kind {other}")),
    };
    let server = script
        .start_unix(Path::new(path))
        .map_err(|e| format!("fake server on {path}: {e}"))?;
    let deadline = Instant::now() + SERVER_LIFETIME;
    while !server.finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(server);
    Ok(())
}

/// The fake server child, killed and reaped on drop if it has not exited by then.
struct ServerProcess {
    child: Child,
    path: PathBuf,
}

impl ServerProcess {
    fn start(settings: &Settings, kind: &str, name: &str, number: usize) -> Result<Self, String> {
        let path = settings.scratch().join(name);
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let child = Command::new(exe)
            .args(["reliability", SERVE_FLAG, kind])
            .arg(&path)
            .arg(number.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the fake server: {e}"))?;
        Ok(ServerProcess { child, path })
    }

    /// Connects to it, retrying until it listens (within 20 s: it builds its script first).
    fn connect(&mut self, config: &Config) -> Result<Connection, String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Connection::connect_unix(&self.path, config) {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        return Err(format!("the fake server exited: {status}"));
                    }
                    if Instant::now() >= deadline {
                        return Err(format!("cannot connect to the fake server: {}", chain(&e)));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.path);
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The same-run baseline: the same flood read raw (no decoding, no queue) until the reply's
/// `"return"` shows up: what the server and the socket alone cost.
fn raw_flood_once(settings: &Settings, index: usize) -> Result<Duration, String> {
    use std::io::{Read, Write};
    let server = ServerProcess::start(
        settings,
        "flood",
        &format!("raw-{index}.sock"),
        FLOOD_EVENTS,
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(&server.path) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => return Err(format!("connect: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 * 1024];
    // Greeting, then the negotiation's reply.
    let mut seen = Vec::new();
    stream
        .write_all(b"{\"execute\": \"qmp_capabilities\", \"id\": 1}\r\n")
        .map_err(|e| e.to_string())?;
    while !seen.windows(8).any(|w| w == b"\"return\"") {
        let n = stream.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("eof before the negotiation reply".into());
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let t0 = Instant::now();
    stream
        .write_all(b"{\"execute\": \"query-status\", \"id\": 2}\r\n")
        .map_err(|e| e.to_string())?;
    // The events come first and never hold the word "return": count bytes until they are
    // all in, then look for the reply in what follows (keeping a few bytes of overlap).
    let flood_bytes = FLOOD_EVENTS * EVENT_BYTES;
    let mut total = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    loop {
        if Instant::now() >= t0 + FLOOD_COMMAND_TIMEOUT {
            return Err("raw flood: no reply within the deadline".into());
        }
        let n = stream.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("eof before the reply".into());
        }
        total += n;
        if total + 64 >= flood_bytes {
            tail.extend_from_slice(&buf[..n]);
            if tail.windows(8).any(|w| w == b"\"return\"") {
                break;
            }
            let keep = tail.len().saturating_sub(8);
            tail.drain(..keep);
        }
    }
    let elapsed = t0.elapsed();
    drop(stream);
    drop(server);
    Ok(elapsed)
}

struct FloodRun {
    latency: Duration,
    peak_growth: i64,
    delivered: usize,
    dropped: u64,
}

fn flood_once(settings: &Settings, index: usize, config: &Config) -> Result<FloodRun, String> {
    let mut server = ServerProcess::start(
        settings,
        "flood",
        &format!("flood-{index}.sock"),
        FLOOD_EVENTS,
    )?;
    let mut conn = server.connect(config)?;
    if !sys::reset_peak_rss() {
        return Err("cannot reset the peak RSS (/proc/self/clear_refs)".into());
    }
    let base = sys::rss_bytes();
    let t0 = Instant::now();
    let reply = conn.execute_with_timeout("query-status", None, FLOOD_COMMAND_TIMEOUT);
    let latency = t0.elapsed();
    let peak = sys::peak_rss_bytes();
    let reply = reply.map_err(|e| format!("query-status: {}", chain(&e)))?;
    if reply["running"] != json!(true) {
        return Err(format!("wrong reply: {reply}"));
    }
    let delivered = conn.drain_events().len();
    let dropped = conn.events_dropped();
    drop(conn);
    drop(server);
    Ok(FloodRun {
        latency,
        peak_growth: peak as i64 - base as i64,
        delivered,
        dropped,
    })
}

/// Figure 4: 100k events of 1 KiB before one reply.
pub fn run_event_flood(settings: &Settings) -> Figure {
    let mut figure = Figure::new("event-flood");
    let config = Config::default();
    let cap_bytes = (config.event_capacity * EVENT_BYTES) as i64;
    let budget = cap_bytes + 10 * 1024 * 1024;
    let mut runs: Vec<FloodRun> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for i in 0..settings.event_flood_runs {
        match flood_once(settings, i, &config) {
            Ok(r) => {
                eprintln!(
                    "  event flood {i}: reply after {:.0} ms, peak RSS +{:.1} MiB",
                    r.latency.as_secs_f64() * 1e3,
                    r.peak_growth as f64 / 1048576.0
                );
                runs.push(r);
            }
            Err(e) => errors.push(e),
        }
    }
    let mut raw: Vec<Duration> = Vec::new();
    for i in 0..settings.event_flood_runs {
        match raw_flood_once(settings, i) {
            Ok(d) => raw.push(d),
            Err(e) => errors.push(format!("raw baseline: {e}")),
        }
    }
    let raw_stats = Stats::of(&raw);
    let n = settings.event_flood_runs;
    let stats = Stats::of(&runs.iter().map(|r| r.latency).collect::<Vec<_>>());
    let worst_growth = runs.iter().map(|r| r.peak_growth).max().unwrap_or(i64::MAX);
    let accounted = runs
        .iter()
        .filter(|r| r.delivered as u64 + r.dropped == FLOOD_EVENTS as u64)
        .count();
    let bounded = runs
        .iter()
        .filter(|r| r.delivered <= config.event_capacity)
        .count();
    figure.check(
        format!("runs with a correct reply ({FLOOD_EVENTS} x {EVENT_BYTES} B events first)"),
        format!("{n}/{n}"),
        format!("{}/{n}", runs.len()),
        runs.len() == n,
    );
    figure.check(
        "reply latency over the runs",
        "p99 < 1 s",
        stats.to_string(),
        runs.len() == n && stats.p99_ms < 1000.0,
    );
    figure.check(
        "peak RSS growth (VmHWM)",
        format!("<= cap + 10 MiB = {:.1} MiB", budget as f64 / 1048576.0),
        format!("{:.1} MiB (worst run)", worst_growth as f64 / 1048576.0),
        !runs.is_empty() && worst_growth <= budget,
    );
    figure.check(
        "events queued + dropped = sent, queue <= capacity",
        format!("{n}/{n}"),
        format!("{}/{n}", accounted.min(bounded)),
        accounted == n && bounded == n,
    );
    figure.check(
        "same-run baseline: the same bytes read raw, no decoding",
        "report",
        raw_stats.to_string(),
        true,
    );
    figure.detail("latency", stats.to_json());
    figure.detail("raw_baseline", raw_stats.to_json());
    figure.detail(
        "runs",
        json!(runs
            .iter()
            .map(
                |r| json!({"latency_ms": super::round3(r.latency.as_secs_f64() * 1e3),
                "peak_rss_growth": r.peak_growth, "delivered": r.delivered, "dropped": r.dropped})
            )
            .collect::<Vec<_>>()),
    );
    figure.detail(
        "event_cap",
        json!({"events": config.event_capacity, "bytes": cap_bytes}),
    );
    figure.note(format!(
        "event cap = {} events x {EVENT_BYTES} B = {:.1} MiB; the server runs in a child process",
        config.event_capacity,
        cap_bytes as f64 / 1048576.0
    ));
    if cfg!(debug_assertions) {
        figure.note(
            "unoptimised build: decoding 100 MB of events costs about 1 s in debug code; \
             build qmp-proto and qmp-client with opt-level 3 (profile.dev.package) or use --release",
        );
    }
    for e in errors.iter().take(3) {
        figure.note(e.clone());
    }
    figure
}

struct BigRun {
    result: Result<usize, String>,
    peak_growth: i64,
}

fn big_once(settings: &Settings, size: usize, config: &Config) -> Result<BigRun, String> {
    let mut server = ServerProcess::start(settings, "big", &format!("big-{size}.sock"), size)?;
    let mut conn = server.connect(config)?;
    if !sys::reset_peak_rss() {
        return Err("cannot reset the peak RSS (/proc/self/clear_refs)".into());
    }
    let base = sys::rss_bytes();
    let reply = conn.execute_with_timeout("query-big", None, Duration::from_secs(30));
    let peak = sys::peak_rss_bytes();
    let result = match reply {
        Ok(value) => Ok(value["data"].as_str().map_or(0, str::len)),
        Err(e) => Err(chain(&e)),
    };
    drop(conn);
    drop(server);
    Ok(BigRun {
        result,
        peak_growth: peak as i64 - base as i64,
    })
}

/// Figure 5: a reply of exactly the cap parses; one byte more is refused with a typed error.
pub fn run_max_message(settings: &Settings) -> Figure {
    let mut figure = Figure::new("max-message");
    let config = Config::default();
    let cap = config.max_message_size;
    let budget = (cap as f64 * 2.5) as i64;
    let mib = |b: i64| b as f64 / 1048576.0;
    match big_once(settings, cap, &config) {
        Ok(run) => {
            let parsed = run.result.as_ref().is_ok_and(|len| *len > cap - 100);
            figure.check(
                format!("reply of exactly the cap ({cap} B) parsed"),
                "ok",
                match &run.result {
                    Ok(len) => format!("ok ({len} B string)"),
                    Err(e) => format!("error: {e}"),
                },
                parsed,
            );
            figure.check(
                "peak RSS growth, cap-sized reply",
                format!("<= 2.5 x cap = {:.1} MiB", mib(budget)),
                format!("{:.1} MiB", mib(run.peak_growth)),
                run.peak_growth <= budget,
            );
        }
        Err(e) => figure.check("reply of exactly the cap parsed", "ok", e, false),
    }
    match big_once(settings, cap + 1, &config) {
        Ok(run) => {
            let typed = run
                .result
                .as_ref()
                .err()
                .is_some_and(|e| e.contains("exceeds the limit"));
            figure.check(
                "cap + 1 rejected with MessageTooLarge",
                "typed error",
                match &run.result {
                    Ok(len) => format!("accepted ({len} B)"),
                    Err(e) => e.clone(),
                },
                typed,
            );
            figure.check(
                "peak RSS growth, cap + 1 reply",
                format!("<= 2.5 x cap = {:.1} MiB", mib(budget)),
                format!("{:.1} MiB", mib(run.peak_growth)),
                run.peak_growth <= budget,
            );
        }
        Err(e) => figure.check("cap + 1 rejected", "typed error", e, false),
    }
    figure.note("message size counts the JSON text without its CRLF terminator");
    figure
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_the_announced_size_and_decode() {
        for i in [0, 7, 99_999] {
            let bytes = event_bytes(i);
            assert_eq!(bytes.len(), EVENT_BYTES);
            assert!(bytes.ends_with(b"\r\n"));
            let value: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(value["data"]["n"], json!(i));
        }
    }

    #[test]
    fn replies_have_exactly_the_requested_size() {
        for size in [100, 4096, 10 * 1024 * 1024, 10 * 1024 * 1024 + 1] {
            let bytes = reply_of_size(Some(&json!(2)), size);
            assert_eq!(bytes.len(), size + 2);
            let value: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(value["id"], json!(2));
        }
    }
}
