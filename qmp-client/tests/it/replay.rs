//! The client against the recorded sessions of every QEMU version in `transcripts/`
//! (`cargo xtask record`): each command of a recording, sent through `Connection` (owned or
//! behind a `Shared` handle), must give exactly what that QEMU answered (the reply's `return`,
//! or its error class and text), with the events it sent queued in order, and the session must
//! end as it ended.

use std::time::Duration;

use qmp_client::replay::{self, Side, Transcript};
use qmp_client::{Config, Connection, Error, OobPolicy, Shared};
use qmp_proto::{ErrorClass, Event};
use serde_json::{Map, Value};

/// Every recorded transcript; the set must cover the three versions we test against.
fn transcripts() -> Vec<Transcript> {
    let all = replay::recorded().expect("the recorded transcripts load");
    for version in ["7.2.", "10.0.", "11.1."] {
        assert!(
            all.iter().any(|t| t.qemu.starts_with(version)),
            "no transcript of QEMU {version}x in {}",
            replay::transcripts_dir().display()
        );
    }
    all
}

/// What a recorded QEMU message was, parsed as plain JSON.
fn parsed(text: &str) -> Value {
    serde_json::from_str(text.trim_end()).expect("QEMU's recorded line is JSON")
}

fn arguments(command: &Value) -> Option<Map<String, Value>> {
    command.get("arguments").and_then(Value::as_object).cloned()
}

/// The two ways to drive a session: a `Connection` owned by the caller, or a `Shared` handle
/// whose thread drives it.
enum Client {
    Owned(Box<Connection>),
    Shared(Shared),
}

impl Client {
    fn execute(
        &mut self,
        command: &str,
        args: Option<Map<String, Value>>,
    ) -> qmp_client::Result<Value> {
        match self {
            Client::Owned(c) => c.execute(command, args),
            Client::Shared(s) => s.execute(command, args),
        }
    }

    fn execute_oob(
        &mut self,
        command: &str,
        args: Option<Map<String, Value>>,
    ) -> qmp_client::Result<Value> {
        match self {
            Client::Owned(c) => c.execute_oob(command, args),
            Client::Shared(s) => s.execute_oob(command, args),
        }
    }

    fn pull_event(&mut self, timeout: Duration) -> qmp_client::Result<Option<Event>> {
        match self {
            Client::Owned(c) => c.pull_event(timeout),
            Client::Shared(s) => s.pull_event(timeout),
        }
    }

    fn drain_events(&mut self) -> Vec<Event> {
        match self {
            Client::Owned(c) => c.drain_events(),
            Client::Shared(s) => s.drain_events(),
        }
    }
}

/// Replays every exchange of `transcript` after the handshake through a `Connection`, or
/// through a `Shared` handle over it when `shared`.
fn replay_through_connection(transcript: &Transcript, oob: OobPolicy, shared: bool) {
    let name = format!("QEMU {} {}", transcript.qemu, transcript.name);
    let (server, stream) = transcript.script().start_pair().expect("fake server");
    let config = Config::default()
        .with_oob(oob)
        .with_command_timeout(Duration::from_secs(10));
    let mut qmp = Connection::from_unix_stream(stream, &config)
        .unwrap_or_else(|e| panic!("{name}: handshake: {e}"));

    let greeting = qmp.greeting().expect("a greeting").clone();
    assert_eq!(greeting.version.qemu.to_string(), transcript.qemu, "{name}");
    assert_eq!(greeting.capabilities, ["oob"], "{name}");
    assert_eq!(qmp.oob_enabled(), oob == OobPolicy::Auto, "{name}");
    let mut qmp = if shared {
        Client::Shared(Shared::new(qmp).unwrap_or_else(|e| panic!("{name}: Shared: {e}")))
    } else {
        Client::Owned(Box::new(qmp))
    };

    let mut checked = 0;
    for exchange in transcript.exchanges() {
        let out_of_band = exchange.command.get("exec-oob").is_some();
        if out_of_band && (oob != OobPolicy::Auto || exchange.command.get("id").is_none()) {
            // `exec-oob` without negotiated oob, or without an id: the client never sends
            // those itself.
            continue;
        }
        let Some(command) = exchange.name() else {
            continue;
        };
        if command == "qmp_capabilities" {
            continue;
        }
        let answers: Vec<Value> = exchange.answer.iter().map(|m| parsed(&m.text)).collect();
        assert!(exchange.answer.iter().all(|m| m.from == Side::Qemu));
        if answers.iter().any(|a| {
            a["error"]["desc"]
                .as_str()
                .is_some_and(|d| d.starts_with("Expecting capabilities"))
        }) {
            // The command sent before negotiation: Connection never does that.
            continue;
        }
        let reply = answers
            .iter()
            .find(|a| a.get("return").is_some() || a.get("error").is_some())
            .unwrap_or_else(|| panic!("{name}: no reply recorded for {command}"));
        let result = if out_of_band {
            qmp.execute_oob(command, arguments(&exchange.command))
        } else {
            qmp.execute(command, arguments(&exchange.command))
        };
        match (&result, reply.get("return"), reply.get("error")) {
            (Ok(value), Some(expected), _) => {
                assert_eq!(value, expected, "{name}: {command}")
            }
            (Err(Error::Command { class, desc, .. }), _, Some(expected)) => {
                assert_eq!(
                    class,
                    &ErrorClass::from(expected["class"].as_str().unwrap_or_default()),
                    "{name}: {command}"
                );
                assert_eq!(
                    Some(desc.as_str()),
                    expected["desc"].as_str(),
                    "{name}: {command}"
                );
            }
            _ => panic!("{name}: {command} gave {result:?}, recorded {reply}"),
        }
        // Events are queued, in QEMU's order, whether they came before or after the reply.
        let expected_events: Vec<(String, Option<Value>)> = answers
            .iter()
            .filter(|a| a.get("event").is_some())
            .map(|a| {
                (
                    a["event"].as_str().unwrap_or_default().to_string(),
                    a.get("data").cloned(),
                )
            })
            .collect();
        let mut events = Vec::new();
        while events.len() < expected_events.len() {
            match qmp.pull_event(Duration::from_secs(5)) {
                Ok(Some(event)) => events.push((event.event, event.data)),
                other => panic!("{name}: {command}: waiting for events: {other:?}"),
            }
        }
        if command != "quit" {
            events.extend(qmp.drain_events().into_iter().map(|e| (e.event, e.data)));
        }
        assert_eq!(events, expected_events, "{name}: events of {command}");
        checked += 1;
    }
    assert!(checked > 0, "{name}: no exchange replayed");

    // After `quit` QEMU closed the monitor: the client says so instead of hanging.
    if transcript.end.is_some() {
        let after = qmp.execute("query-status", None);
        assert!(
            matches!(after, Err(Error::Closed | Error::Disconnected { .. })),
            "{name}: after the end: {after:?}"
        );
    }
    drop(server);
}

#[test]
fn every_recorded_session_replays_through_the_client() {
    for transcript in transcripts() {
        replay_through_connection(&transcript, OobPolicy::Off, false);
    }
}

#[test]
fn every_recorded_session_replays_through_a_shared_handle() {
    for transcript in transcripts() {
        replay_through_connection(&transcript, OobPolicy::Off, true);
    }
}

#[test]
fn every_recorded_session_replays_with_oob_negotiated() {
    for transcript in transcripts() {
        replay_through_connection(&transcript, OobPolicy::Auto, false);
    }
}

#[test]
fn the_recordings_hold_what_the_tests_rely_on() {
    for transcript in transcripts() {
        let name = format!("QEMU {} {}", transcript.qemu, transcript.name);
        let end = transcript
            .end
            .clone()
            .unwrap_or_else(|| panic!("{name}: no end"));
        // Timings are recorded and increase.
        let times: Vec<Duration> = transcript.messages.iter().map(|m| m.at).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{name}");
        assert!(end.at >= *times.last().unwrap_or(&Duration::ZERO), "{name}");
        match transcript.name.as_str() {
            "session" => {
                assert_eq!(end.exit, Some(0), "{name}");
                let exchanges = transcript.exchanges();
                let schema = exchanges
                    .iter()
                    .find(|e| e.name() == Some("query-qmp-schema"))
                    .unwrap_or_else(|| panic!("{name}: no query-qmp-schema"));
                assert!(
                    schema.answer[0].text.len() > 100_000,
                    "{name}: schema too small"
                );
            }
            "oob" => {
                assert_eq!(end.exit, Some(0), "{name}");
                let refused = transcript
                    .exchanges()
                    .into_iter()
                    .find(|e| e.command["exec-oob"] == "query-status")
                    .unwrap_or_else(|| panic!("{name}: no exec-oob query-status"));
                assert!(
                    refused.answer[0].text.contains("does not support OOB"),
                    "{name}: {:?}",
                    refused.answer
                );
            }
            "deprecated" => {
                // 11.1 deprecates query-kvm: our -compat policy makes it a CommandNotFound.
                let query_kvm = transcript
                    .exchanges()
                    .into_iter()
                    .find(|e| e.name() == Some("query-kvm"))
                    .unwrap_or_else(|| panic!("{name}: no query-kvm"));
                let refused = query_kvm.answer[0].text.contains("disabled by policy");
                assert_eq!(refused, transcript.qemu.starts_with("11."), "{name}");
            }
            "guest-exit" => {
                // isa-debug-exit: `exit 5` -> status (5 << 1) | 1.
                assert_eq!(end.exit, Some(11), "{name}");
            }
            other => panic!("{name}: unknown transcript kind {other}"),
        }
    }
}
