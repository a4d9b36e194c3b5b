//! Fuzz target `agent`: qmp-client's guest-agent client against a scripted fake agent over a
//! socketpair. The script (from the input) answers each request the client sends: the right
//! reply, a reply with another id or none, garbage before or instead of it, a lone `0xFF`, an
//! error, silence (the client times out), or the end of the channel.
//!
//! Invariants: no panic; every call ends within its deadline (libFuzzer's timeout catches a
//! hang) with a typed error or a value, and a value only when the fake agent's answer to that
//! very request was the right reply carrying it (never a stale reply, never garbage).
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use qmp_client::{Agent, AgentConfig};
use qmp_proto::Decoder;
use serde_json::{json, Value};

#[derive(Arbitrary, Debug, Clone)]
enum Answer {
    Right(u8),
    WrongId(u8),
    NoId(u8),
    GarbageThenRight(Vec<u8>, u8),
    Garbage(Vec<u8>),
    Delimiter,
    Error,
    Silence,
    Close,
}

/// What the fake agent last answered to a command (not a sync): the value, if it was right.
type LastAnswer = Arc<Mutex<Option<Option<u8>>>>;

fn fake_agent(mut stream: UnixStream, script: Vec<Answer>, last: LastAnswer) {
    let mut script = script.into_iter();
    let mut decoder = Decoder::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // The client's 0xFF resets the agent's parser; ours just skips it.
        let bytes: Vec<u8> = buf[..n].iter().copied().filter(|&b| b != 0xFF).collect();
        decoder.feed(&bytes);
        while let Some(next) = decoder.next_object() {
            let Ok(request) = next else { continue };
            let sync = request.get("execute") == Some(&json!("guest-sync-delimited"));
            let (id, prefix) = if sync {
                (request["arguments"]["id"].clone(), vec![0xFF])
            } else {
                (request.get("id").cloned().unwrap_or(Value::Null), vec![])
            };
            let answer = script.next().unwrap_or(Answer::Close);
            let reply = |value: Value, id: Option<Value>| {
                let mut object = json!({ "return": value });
                if let Some(id) = id {
                    object["id"] = id;
                }
                let mut out = prefix.clone();
                out.extend_from_slice(object.to_string().as_bytes());
                out.extend_from_slice(b"\n");
                out
            };
            // A sync's right reply returns its token; a command's returns the value with its id.
            let right = |v: u8| {
                if sync {
                    reply(id.clone(), None)
                } else {
                    reply(json!(v), Some(id.clone()))
                }
            };
            let out = match &answer {
                Answer::Right(v) => right(*v),
                Answer::WrongId(v) => {
                    let other = json!(id.as_u64().unwrap_or(0).wrapping_add(1));
                    if sync {
                        reply(other, None)
                    } else {
                        reply(json!(v), Some(other))
                    }
                }
                Answer::NoId(v) => reply(json!(v), None),
                Answer::GarbageThenRight(garbage, v) => {
                    let mut out = garbage.clone();
                    out.push(b'\n');
                    out.extend(right(*v));
                    out
                }
                Answer::Garbage(garbage) => garbage.clone(),
                Answer::Delimiter => vec![0xFF],
                Answer::Error => {
                    let mut out = prefix.clone();
                    let object =
                        json!({"error": {"class": "GenericError", "desc": "no"}, "id": id});
                    out.extend_from_slice(object.to_string().as_bytes());
                    out.push(b'\n');
                    out
                }
                Answer::Silence => vec![],
                Answer::Close => return,
            };
            if !sync {
                let value = match answer {
                    Answer::Right(v) | Answer::GarbageThenRight(_, v) => Some(v),
                    _ => None,
                };
                if let Ok(mut last) = last.lock() {
                    *last = Some(value);
                }
            }
            if stream.write_all(&out).is_err() {
                return;
            }
        }
    }
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    let calls = u.int_in_range(1..=3u8)?;
    let script: Vec<Answer> = u.arbitrary_iter()?.take(8).collect::<Result<_, _>>()?;
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let last: LastAnswer = Arc::new(Mutex::new(None));
    let fake = {
        let last = Arc::clone(&last);
        std::thread::spawn(move || fake_agent(theirs, script, last))
    };
    let config = AgentConfig::default()
        .with_command_timeout(Duration::from_millis(150))
        .with_sync_attempt_timeout(Duration::from_millis(30))
        .with_no_reply_wait(Duration::from_millis(30));
    if let Ok(mut agent) = Agent::from_unix_stream(ours, &config) {
        for _ in 0..calls {
            if let Ok(mut l) = last.lock() {
                *l = None;
            }
            match agent.execute("guest-ping", None) {
                Ok(value) => {
                    let answered = last.lock().map(|l| *l).unwrap_or(None);
                    match answered {
                        Some(Some(v)) => assert_eq!(value, json!(v), "returned another value"),
                        other => panic!("returned {value} but the agent answered {other:?}"),
                    }
                }
                Err(err) => {
                    let _ = err.to_string();
                }
            }
        }
    }
    fake.join().expect("fake agent");
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
