//! Figure "fleet-chaos": random members of a 50-machine `Fleet` are SIGKILLed at random points
//! (0-20 ms) while commands run on all of them from one thread. Every call on a dead member
//! must end in a typed error (never a timeout) within the call's deadline; the members not
//! killed must all answer, and all of them must then shut down gracefully; the killed ones'
//! reports must say SIGKILL; nothing may leak.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use machine_core::{qmp_client, EndedBy, Error, Fleet, MemberId};
use nix::sys::signal::Signal;
use serde_json::json;

use super::{chain, sys, Figure, Rng, Settings};

/// Members in the fleet (full run; the quick run uses fewer).
const MEMBERS: usize = 50;
/// Command rounds per fleet; each kills `KILLS_PER_ROUND` random live members.
const ROUNDS: usize = 4;
const KILLS_PER_ROUND: usize = 3;
/// The kills land uniformly in `0..KILL_WINDOW` after the round's commands start.
const KILL_WINDOW_US: u64 = 20_000;
/// The deadline of each round's command on all members.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Slack on top of a deadline for a loaded machine.
const SLACK: Duration = Duration::from_millis(500);
/// The commands, cycled by round.
const COMMANDS: [&str; 4] = [
    "query-status",
    "query-commands",
    "query-version",
    "qom-list",
];

/// How a call ended, as counted in the figure.
fn classify(result: &Result<serde_json::Value, Error>) -> &'static str {
    match result {
        Ok(reply) if reply.get("error").is_some() => "qmp error reply",
        Ok(_) => "ok",
        Err(Error::Qmp { source, .. }) => match source {
            qmp_client::Error::CommandTimeout { .. } => "CommandTimeout (hang)",
            qmp_client::Error::Disconnected { .. } => "Disconnected",
            qmp_client::Error::Eof { .. } => "Eof",
            qmp_client::Error::Io { .. } => "Io",
            qmp_client::Error::Closed => "Closed",
            _ => "other qmp error",
        },
        Err(Error::NotRunning) => "NotRunning",
        Err(_) => "other error",
    }
}

/// Runs the figure.
pub fn run(settings: &Settings) -> Figure {
    let mut figure = Figure::new("fleet-chaos");
    let members = if settings.quick { 8 } else { MEMBERS };
    let rounds = if settings.quick { 2 } else { ROUNDS };
    let mut rng = Rng::new(settings.seed ^ 0xf1ee7);
    let mut fleet = match Fleet::new() {
        Ok(fleet) => fleet,
        Err(e) => {
            figure.check("fleet created", "yes", chain(&e), false);
            return figure;
        }
    };
    for _ in 0..members {
        let mut builder = settings.none_machine();
        builder.command_timeout(COMMAND_TIMEOUT);
        fleet.add(builder.build());
    }
    let started = Instant::now();
    let launch_errors: Vec<String> = fleet
        .launch_all()
        .into_iter()
        .filter_map(|(id, r)| r.err().map(|e| format!("{id}: {}", chain(&e))))
        .collect();
    let launch_time = started.elapsed();
    figure.check(
        "members launched",
        format!("{members}"),
        format!("{} in {launch_time:?}", members - launch_errors.len()),
        launch_errors.is_empty(),
    );

    let mut killed: BTreeSet<MemberId> = BTreeSet::new();
    // Per outcome kind: calls on members killed during or before the round, and on the rest.
    let mut on_dead: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut on_alive: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut late_rounds = Vec::new();
    for round in 0..rounds {
        let live: Vec<MemberId> = fleet.running().filter(|id| !killed.contains(id)).collect();
        let mut victims = Vec::new();
        while victims.len() < KILLS_PER_ROUND.min(live.len().saturating_sub(1)) {
            let pick = live[rng.below(live.len() as u64) as usize];
            if !victims.iter().any(|(id, _, _)| *id == pick) {
                let delay = Duration::from_micros(rng.below(KILL_WINDOW_US));
                let pid = fleet.machine(pick).pid().unwrap_or(0);
                victims.push((pick, pid, delay));
            }
        }
        let ids: Vec<MemberId> = fleet.ids().collect();
        let command = COMMANDS[round % COMMANDS.len()];
        let args = if command == "qom-list" {
            json!({"path": "/machine"})
        } else {
            json!({})
        };
        let t = Instant::now();
        let replies = std::thread::scope(|scope| {
            // Joined before any reaping (shutdown_all below), so no pid can have been reused.
            let killer = scope.spawn(|| {
                let mut sorted = victims.clone();
                sorted.sort_by_key(|v| v.2);
                for (_, pid, delay) in sorted {
                    let wait = delay.saturating_sub(t.elapsed());
                    std::thread::sleep(wait);
                    if pid != 0 {
                        let _ = sys::signal(pid, Signal::SIGKILL);
                    }
                }
            });
            let replies = fleet.qmp_all(&ids, command, args, COMMAND_TIMEOUT);
            let _ = killer.join();
            replies
        });
        let took = t.elapsed();
        if took > COMMAND_TIMEOUT + SLACK {
            late_rounds.push(format!("round {round}: {took:?}"));
        }
        killed.extend(victims.iter().map(|v| v.0));
        for (id, reply) in &replies {
            let kind = classify(reply);
            let bucket = if killed.contains(id) {
                &mut on_dead
            } else {
                &mut on_alive
            };
            *bucket.entry(kind).or_default() += 1;
        }
    }
    let dead_calls: usize = on_dead.values().sum();
    let dead_typed: usize = on_dead
        .iter()
        .filter(|(k, _)| !matches!(**k, "CommandTimeout (hang)" | "other error"))
        .map(|(_, n)| n)
        .sum();
    figure.check(
        "calls on killed members ending in a result or a typed error (no timeout)",
        "100 %",
        format!("{dead_typed}/{dead_calls}: {on_dead:?}"),
        dead_typed == dead_calls && dead_calls > 0,
    );
    let alive_calls: usize = on_alive.values().sum();
    let alive_ok = on_alive.get("ok").copied().unwrap_or(0);
    figure.check(
        "calls on the other members answered",
        "100 %",
        format!("{alive_ok}/{alive_calls}: {on_alive:?}"),
        alive_ok == alive_calls && alive_calls > 0,
    );
    figure.check(
        "rounds within their deadline",
        format!("{rounds}/{rounds} within {:?}", COMMAND_TIMEOUT + SLACK),
        format!("{} late {late_rounds:?}", late_rounds.len()),
        late_rounds.is_empty(),
    );

    let t = Instant::now();
    let reports = fleet.shutdown_all(Duration::from_secs(10));
    let shutdown_time = t.elapsed();
    let mut graceful = 0;
    let mut killed_reported = 0;
    let mut wrong = Vec::new();
    for (id, report) in &reports {
        match (killed.contains(id), report) {
            (false, Ok(r)) if r.ended_by == EndedBy::Quit && r.clean() => graceful += 1,
            (true, Ok(r))
                if r.ended_by
                    == EndedBy::ExternalSignal {
                        signal: libc::SIGKILL,
                    } =>
            {
                killed_reported += 1
            }
            (_, other) => wrong.push(format!(
                "{id}: {}",
                match other {
                    Ok(r) => r.summary(),
                    Err(e) => chain(e),
                }
            )),
        }
    }
    let survivors = members - killed.len();
    figure.check(
        "members not killed shut down gracefully (quit)",
        format!("{survivors}/{survivors}"),
        format!("{graceful}/{survivors} in {shutdown_time:?}"),
        graceful == survivors,
    );
    figure.check(
        "killed members reported as SIGKILLed from outside",
        format!("{}/{}", killed.len(), killed.len()),
        format!("{killed_reported}/{} {wrong:?}", killed.len()),
        killed_reported == killed.len() && wrong.is_empty(),
    );
    drop(fleet);
    figure.detail("on_dead", json!(on_dead));
    figure.detail("on_alive", json!(on_alive));
    figure.detail("members", json!(members));
    figure.detail("killed", json!(killed.len()));
    figure.note(format!(
        "{members} members, {rounds} rounds, {} killed; launch {launch_time:?}, shutdown {shutdown_time:?}",
        killed.len()
    ));
    for e in launch_errors.iter().chain(&wrong).take(3) {
        figure.note(e.clone());
    }
    figure
}
