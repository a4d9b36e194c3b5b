//! `qemu-machine fleet` against stub QEMUs: per-member lines, a member that fails to launch,
//! `--exec` on the others, the summary and the exit status of the worst member.

use std::os::unix::fs::PermissionsExt;

use serde_json::Value;

use crate::util::{run, Live, Run};

/// Greets, then answers each command (`quit`: replies and exits 0). The first copy to start
/// (the one that creates `$0.first`) prints an error and exits 3 instead.
const STUB: &str = r#"#!/bin/bash
for a in "$@"; do
  case "$a" in socket,id=mon,fd=*) MON=${a#socket,id=mon,fd=};; esac
done
if [ -n "$FAIL_FIRST" ] && mkdir "$0.first" 2>/dev/null; then
  echo 'stub: no such device' >&2
  exit 3
fi
if [ -n "$HANG_OTHERS" ] && ! mkdir "$0.first" 2>/dev/null; then
  exec sleep 300
fi
printf '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "stub"}, "capabilities": []}}\r\n' >&$MON
while IFS= read -r -d '}' -u $MON cmd; do
  id=null
  [[ $cmd =~ \"id\":([0-9]+) ]] && id=${BASH_REMATCH[1]}
  case "$cmd" in
    *'"quit"'*) printf '{"return": {}, "id": %s}\r\n' "$id" >&$MON; exit 0 ;;
    *'"query-status"'*) printf '{"return": {"status": "running", "running": true}, "id": %s}\r\n' "$id" >&$MON ;;
    *) printf '{"return": {}, "id": %s}\r\n' "$id" >&$MON ;;
  esac
done
"#;

fn stub(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("qemu-stub");
    std::fs::write(&path, STUB).expect("write stub");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.to_str().expect("utf-8").to_string()
}

/// `qemu-machine fleet --qemu STUB OPTIONS --exit-after-ready -- -M none`.
fn fleet(stub: &str, options: &[&str], env: &[(&str, &str)]) -> Run {
    let mut args = vec!["fleet", "--qemu", stub, "--exit-after-ready"];
    args.extend(options);
    args.extend(["--", "-M", "none"]);
    run(&args, "", env)
}

#[test]
fn every_member_answers_and_is_shut_down() {
    let dir = tempfile::tempdir().expect("dir");
    let stub = stub(&dir);
    let r = fleet(&stub, &["--count", "3", "--exec", "query-status"], &[]);
    r.expect_code(0);
    for i in 0..3 {
        let reply = format!(r#"vm{i} reply: {{"return":{{"running":true,"status":"running"}}}}"#);
        assert!(r.stdout.contains(&reply), "{}", r.stdout);
        assert!(
            r.stdout.contains(&format!("vm{i} exit: pid ")),
            "{}",
            r.stdout
        );
    }
    assert!(
        r.stderr.contains("launched 3, failed 0 of 3"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_member_that_fails_to_launch_is_named_and_the_others_run() {
    let dir = tempfile::tempdir().expect("dir");
    let stub = stub(&dir);
    let r = fleet(
        &stub,
        &["--count", "3", "--json", "--exec", "query-status"],
        &[("FAIL_FIRST", "1")],
    );
    // The worst member: a launch failure.
    r.expect_code(4);
    let lines: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let failed: Vec<&Value> = lines.iter().filter(|l| l["type"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{}", r.stdout);
    let error = failed[0]["error"].as_str().expect("error text");
    assert!(error.contains("stub: no such device"), "{error}");
    let replies = lines.iter().filter(|l| l["type"] == "reply").count();
    let exits: Vec<&Value> = lines.iter().filter(|l| l["type"] == "exit").collect();
    assert_eq!(replies, 2, "{}", r.stdout);
    assert_eq!(exits.len(), 2, "{}", r.stdout);
    assert!(exits.iter().all(|e| e["clean"] == true), "{}", r.stdout);
    assert!(
        r.stderr.contains("launched 2, failed 1 of 3"),
        "{}",
        r.stderr
    );
}

#[test]
fn exec_arguments_must_be_a_json_object() {
    let dir = tempfile::tempdir().expect("dir");
    let stub = stub(&dir);
    let r = fleet(&stub, &["-n", "1", "--exec", "stop [1]"], &[]);
    assert!(r.stderr.contains("must be a JSON object"), "{}", r.stderr);
    assert_ne!(r.code, Some(0));
}

/// Ctrl-C while members are still starting ends the launch at once: the member that came up
/// is shut down cleanly, the two that never greet are killed and shown as aborted (not as
/// failed), and the status is 130 as for `run`. Their greeting deadline is 30 s: the signal,
/// not the deadline, ended it.
#[test]
fn ctrl_c_during_the_launch_aborts_the_pending_members() {
    let dir = tempfile::tempdir().expect("dir");
    let stub = stub(&dir);
    let mut live = Live::start(
        &[
            "fleet",
            "--qemu",
            &stub,
            "--count",
            "3",
            "--json",
            "--launch-timeout",
            "30s",
            "--",
            "-M",
            "none",
        ],
        &[("HANG_OTHERS", "1")],
    );
    // The first member is up (the other two never greet).
    live.wait_stderr("launched 1, failed 0 of 3");
    nix::sys::signal::kill(live.pid(), nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let r = live.finish();
    r.expect_code(130);
    assert!(
        r.elapsed < std::time::Duration::from_secs(15),
        "took {:?}",
        r.elapsed
    );
    let lines: Vec<Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let of = |kind: &str| lines.iter().filter(|l| l["type"] == kind).count();
    assert_eq!(of("aborted"), 2, "{}", r.stdout);
    assert_eq!(of("failed"), 0, "{}", r.stdout);
    let exits: Vec<&Value> = lines.iter().filter(|l| l["type"] == "exit").collect();
    assert_eq!(exits.len(), 1, "{}", r.stdout);
    assert_eq!(exits[0]["clean"], true, "{}", r.stdout);
}
