//! Shared helpers of the integration tests: connecting to a fake server, timing, JSON maps.

use std::time::{Duration, Instant};

use qmp_client::testing::{FakeServer, Script};
use qmp_client::{Config, Connection, Result};
use serde_json::{Map, Value};

/// A config with short deadlines, so failing tests fail fast.
pub fn config() -> Config {
    Config::default()
        .with_greeting_timeout(Duration::from_secs(5))
        .with_command_timeout(Duration::from_secs(5))
        .with_connect_timeout(Duration::from_secs(5))
}

/// Starts `script` on a socketpair and connects with `config`.
pub fn connect_with(script: Script, config: &Config) -> (FakeServer, Result<Connection>) {
    let (server, stream) = script.start_pair().expect("start fake server");
    let conn = Connection::from_unix_stream(stream, config);
    (server, conn)
}

/// Starts `script` and connects with [`config`], expecting success.
pub fn connect(script: Script) -> (FakeServer, Connection) {
    let (server, conn) = connect_with(script, &config());
    (server, conn.expect("handshake with fake server"))
}

/// `value` (a JSON object) as an argument map.
pub fn args(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// Runs `f` and returns its result with the time it took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// Asserts `elapsed` is within [`expected`, `expected` + 100 ms (+ CI slack)].
pub fn assert_near(elapsed: Duration, expected: Duration) {
    assert!(
        elapsed >= expected && elapsed <= expected + Duration::from_millis(150),
        "took {elapsed:?}, expected {expected:?} (+100 ms)"
    );
}

/// A unique short temporary directory (unix socket paths must stay short).
pub fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qc")
        .tempdir_in("/tmp")
        .expect("tempdir")
}
