//! `Fleet` against stub QEMUs: members that fail to launch, hang, die during a command or are
//! killed from outside end in their own slot without holding the others up; drop kills and
//! reaps every member; no member holds another's sockets.

use std::time::{Duration, Instant};

use machine_core::qmp_client;
use machine_core::qmp_proto::EventFilter;
use machine_core::{EndedBy, Error, Fleet, MachineState, MemberId};

use crate::stub::{pid_exists, shared, Stub};

/// Greets, answers `qmp_capabilities`, then reads one command and exits 1 without a reply.
const DIES_ON_COMMAND: &str = "greet\nserve_one\nIFS= read -r -d '}' -u $MON cmd\nexit 1";
/// Greets, answers `qmp_capabilities`, then never answers again.
const HANGS_AFTER_HANDSHAKE: &str = "greet\nserve_one\nexec sleep 300";
/// Greets, answers `qmp_capabilities`, then sends STOP before the reply to the next command.
const STOPS: &str = r#"greet
serve_one
IFS= read -r -d '}' -u $MON cmd
[[ $cmd =~ \"id\":([0-9]+) ]] && id=${BASH_REMATCH[1]}
printf '{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}\r\n' >&$MON
printf '{"return": {}, "id": %s}\r\n' "$id" >&$MON
while true; do serve_one; done"#;

fn fleet_of(stubs: &[&Stub]) -> (Fleet, Vec<MemberId>) {
    let mut fleet = Fleet::new().expect("fleet");
    let ids = stubs.iter().map(|s| fleet.add(s.machine())).collect();
    (fleet, ids)
}

#[test]
fn failed_launches_end_in_their_own_slot_and_the_others_run() {
    let _g = shared();
    let good = Stub::serving();
    let exits = Stub::new("echo 'no such machine' >&2\nexit 3");
    let silent = Stub::new("exec sleep 300");
    let mut fleet = Fleet::new().expect("fleet");
    let a = fleet.add(good.machine());
    let b = fleet.add(exits.machine());
    let mut slow = silent.builder();
    slow.greeting_timeout(Duration::from_millis(400));
    let c = fleet.add(slow.build());
    let d = fleet.add(good.machine());
    let started = Instant::now();
    let results = fleet.launch_all();
    let took = started.elapsed();
    // The handshakes run together: the silent member's deadline bounds the whole launch.
    assert!(took < Duration::from_secs(4), "took {took:?}");
    assert_eq!(
        results.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![a, b, c, d]
    );
    assert!(results[0].1.is_ok(), "{:?}", results[0].1);
    assert!(results[3].1.is_ok(), "{:?}", results[3].1);
    match &results[1].1 {
        Err(Error::LaunchFailed { status, output, .. }) => {
            assert_eq!(status.and_then(|s| s.code()), Some(3));
            assert!(output.contains("no such machine"), "{output}");
        }
        other => panic!("{other:?}"),
    }
    match &results[2].1 {
        Err(Error::LaunchFailed { killed, cause, .. }) => {
            assert!(killed);
            assert!(
                matches!(&**cause, Error::Qmp { source, .. }
                    if matches!(source, qmp_client::Error::GreetingTimeout { .. })),
                "{cause:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fleet.state(b), MachineState::Idle);
    assert_eq!(fleet.running().collect::<Vec<_>>(), vec![a, d]);
    let replies = fleet.qmp_all(&[a, d], "query-status", (), Duration::from_secs(5));
    for (_, reply) in &replies {
        let reply = reply.as_ref().expect("reply");
        assert_eq!(reply["return"]["status"], "running");
    }
    for (id, report) in fleet.shutdown_all(Duration::from_secs(5)) {
        let report = report.expect("graceful");
        assert_eq!(report.ended_by, EndedBy::Quit, "{id}");
        assert!(report.status.success());
    }
    drop(fleet);
    for stub in [&good, &exits, &silent] {
        assert_eq!(stub.leftovers(), 0);
    }
}

#[test]
fn a_hung_member_times_out_a_dead_one_fails_fast_and_the_rest_answer() {
    let _g = shared();
    let good = Stub::serving();
    let hung = Stub::new(HANGS_AFTER_HANDSHAKE);
    let dies = Stub::new(DIES_ON_COMMAND);
    let (mut fleet, ids) = fleet_of(&[&good, &hung, &dies, &good]);
    for (id, result) in fleet.launch_all() {
        result.unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    let started = Instant::now();
    let replies = fleet.qmp_all(&ids, "query-status", (), Duration::from_millis(800));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(800), "took {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(
        replies[0].1.as_ref().expect("good")["return"]["running"],
        true
    );
    assert_eq!(
        replies[3].1.as_ref().expect("good")["return"]["running"],
        true
    );
    match &replies[1].1 {
        Err(Error::Qmp { source, .. }) => assert!(
            matches!(source, qmp_client::Error::CommandTimeout { .. }),
            "{source:?}"
        ),
        other => panic!("{other:?}"),
    }
    match &replies[2].1 {
        Err(Error::Qmp { source, .. }) => assert!(
            !matches!(source, qmp_client::Error::CommandTimeout { .. }),
            "{source:?}"
        ),
        other => panic!("{other:?}"),
    }
    let started = Instant::now();
    let reports = fleet.shutdown_all(Duration::from_millis(500));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(reports[0]
        .1
        .as_ref()
        .is_ok_and(|r| r.ended_by == EndedBy::Quit));
    assert!(reports[3]
        .1
        .as_ref()
        .is_ok_and(|r| r.ended_by == EndedBy::Quit));
    match &reports[1].1 {
        Err(Error::AbnormalShutdown { report, cause }) => {
            assert_eq!(report.ended_by, EndedBy::Kill);
            // The ladder's quit step: no reply (QEMU hangs), so no exit either.
            assert!(
                matches!(
                    **cause,
                    Error::ExitTimeout { .. } | Error::StepFailed { .. }
                ),
                "{cause:?}"
            );
            assert!(report.steps.len() == 2, "{:?}", report.steps);
        }
        other => panic!("{other:?}"),
    }
    match &reports[2].1 {
        Ok(report) => assert_eq!(report.status.code(), Some(1)),
        other => panic!("{other:?}"),
    }
    drop(fleet);
    for stub in [&good, &hung, &dies] {
        assert_eq!(stub.leftovers(), 0);
    }
}

#[test]
fn a_member_killed_from_outside_is_reported_and_the_others_go_on() {
    let _g = shared();
    let good = Stub::serving();
    let (mut fleet, ids) = fleet_of(&[&good, &good, &good]);
    for (_, result) in fleet.launch_all() {
        result.expect("launch");
    }
    let victim = ids[1];
    let pid = fleet.machine(victim).pid().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let replies = fleet.qmp_all(&ids, "query-status", (), Duration::from_secs(5));
    assert!(replies[0].1.is_ok());
    assert!(replies[2].1.is_ok());
    assert!(
        matches!(replies[1].1, Err(Error::Qmp { .. })),
        "{:?}",
        replies[1].1
    );
    // The monitor's end-of-file comes before the kernel reports the exit: wait for it.
    let until = Instant::now() + Duration::from_secs(5);
    while fleet.state(victim) != MachineState::Exited && Instant::now() < until {
        std::thread::yield_now();
    }
    assert_eq!(fleet.state(victim), MachineState::Exited);
    let reports = fleet.shutdown_all(Duration::from_secs(5));
    assert_eq!(
        reports[1].1.as_ref().expect("reaped").ended_by,
        EndedBy::ExternalSignal {
            signal: libc::SIGKILL
        }
    );
    assert!(reports[0]
        .1
        .as_ref()
        .is_ok_and(|r| r.ended_by == EndedBy::Quit));
    assert!(reports[2]
        .1
        .as_ref()
        .is_ok_and(|r| r.ended_by == EndedBy::Quit));
}

#[test]
fn events_say_which_member_sent_them() {
    let _g = shared();
    let good = Stub::serving();
    let stops = Stub::new(STOPS);
    let (mut fleet, ids) = fleet_of(&[&good, &stops, &good]);
    for (_, result) in fleet.launch_all() {
        result.expect("launch");
    }
    for (id, reply) in fleet.qmp_all(&ids, "stop", (), Duration::from_secs(5)) {
        reply.unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    let (id, event) = fleet
        .event_wait(&[EventFilter::new("STOP")], Duration::from_secs(5))
        .expect("STOP");
    assert_eq!(id, ids[1]);
    assert_eq!(event.event, "STOP");
    let started = Instant::now();
    let err = fleet
        .event_wait(&[EventFilter::new("STOP")], Duration::from_millis(300))
        .expect_err("only one STOP");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        matches!(&err, Error::Qmp { source, .. }
            if matches!(source, qmp_client::Error::EventTimeout { .. })),
        "{err:?}"
    );
}

#[test]
fn dropping_the_fleet_kills_and_reaps_every_member() {
    let _g = shared();
    let good = Stub::serving();
    let hung = Stub::new(HANGS_AFTER_HANDSHAKE);
    let (mut fleet, ids) = fleet_of(&[&good, &hung, &good]);
    for (_, result) in fleet.launch_all() {
        result.expect("launch");
    }
    let pids: Vec<u32> = ids
        .iter()
        .map(|&id| fleet.machine(id).pid().expect("pid"))
        .collect();
    let started = Instant::now();
    drop(fleet);
    assert!(started.elapsed() < Duration::from_secs(3));
    for pid in pids {
        assert!(!pid_exists(pid), "{pid} still exists");
    }
    assert_eq!(good.leftovers(), 0);
    assert_eq!(hung.leftovers(), 0);
}

#[test]
fn no_member_holds_another_members_sockets_or_pipes() {
    let _g = shared();
    let good = Stub::new("greet\nserve_one\nexec sleep 300");
    let (mut fleet, ids) = fleet_of(&[&good, &good, &good, &good]);
    for (_, result) in fleet.launch_all() {
        result.expect("launch");
    }
    let tables: Vec<Vec<String>> = ids
        .iter()
        .map(|&id| {
            let pid = fleet.machine(id).pid().expect("pid");
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .expect("fd table")
                .flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| t.display().to_string())
                .filter(|t| t.starts_with("socket:") || t.starts_with("pipe:"))
                .collect()
        })
        .collect();
    for (i, table) in tables.iter().enumerate() {
        // Its monitor (bash may hold it twice), and its output pipe (stdout and stderr).
        let sockets: std::collections::BTreeSet<&String> =
            table.iter().filter(|t| t.starts_with("socket:")).collect();
        assert_eq!(sockets.len(), 1, "{table:?}");
        for (j, other) in tables.iter().enumerate() {
            if i != j {
                assert!(
                    table.iter().all(|t| !other.contains(t)),
                    "member {i} shares {table:?} with member {j}: {other:?}"
                );
            }
        }
    }
}

/// An abort fd that turns readable mid-launch (here written as the first member comes up)
/// ends the launch at once: members still shaking hands are killed and rolled back with
/// `LaunchAborted` as the cause, members not spawned yet get `LaunchAborted`, the member that
/// launched stays running.
#[test]
fn an_aborted_launch_ends_the_pending_members_and_keeps_the_launched() {
    use std::io::Write;
    let _g = shared();
    let good = Stub::serving();
    let silent = Stub::new("exec sleep 300");
    let mut fleet = Fleet::new().expect("fleet");
    let first = fleet.add(good.machine());
    let hung: Vec<MemberId> = (0..3).map(|_| fleet.add(silent.machine())).collect();
    // Two at once: the first and one hung member spawn, two wait their turn.
    fleet.set_spawn_cap(Some(2));
    let (abort, poke) = nix::unistd::pipe().expect("pipe");
    let mut poke = std::fs::File::from(poke);
    let started = Instant::now();
    let results = fleet.launch_all_with_abort(std::os::fd::AsFd::as_fd(&abort), |id, result| {
        if id == first && result.is_ok() {
            poke.write_all(b"!").expect("poke");
        }
    });
    let took = started.elapsed();
    // The silent members' greeting deadline is 10 s: the abort, not the deadline, ended it.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(results[0].1.is_ok(), "{:?}", results[0].1);
    let mut killed = 0;
    let mut not_spawned = 0;
    for (id, result) in &results[1..] {
        assert!(hung.contains(id));
        match result {
            Err(Error::LaunchFailed {
                cause, killed: k, ..
            }) if matches!(**cause, Error::LaunchAborted) => {
                assert!(*k, "{result:?}");
                killed += 1;
            }
            Err(Error::LaunchAborted) => not_spawned += 1,
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!((killed, not_spawned), (1, 2));
    assert_eq!(fleet.running().collect::<Vec<_>>(), vec![first]);
    for (id, report) in fleet.shutdown_all(Duration::from_secs(10)) {
        assert_eq!(id, first);
        assert_eq!(report.expect("report").ended_by, EndedBy::Quit);
    }
    assert_eq!(good.leftovers() + silent.leftovers(), 0);
}
