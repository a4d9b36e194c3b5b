//! End-to-end scenarios for the QMP multiplexer: a `Machine` launched with a shared monitor,
//! and real clients attached to it while the machine keeps issuing its own commands and
//! waiting for its own events: QEMU's Python `qemu.qmp` (from PyPI, in the venv under
//! `target/` that `cargo xtask bench` also uses), its `qmp-shell`, and our own `qemu-machine
//! qmp`, `events` and `shell`.

use std::time::Duration;

use machine_core::qmp_client::{MuxConfig, QuitPolicy, ShareAddress};
use machine_core::{EndedBy, Machine, MachineBuilder};
use serde_json::Value;

use super::cli::{one_shot, typed_error_and_events, Proc};
use super::{Accel, Ctx, Scenario};

const TCG: &[Accel] = &[Accel::Tcg];

/// The scenarios of this area.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "mux_real_clients_share_a_running_machine",
            accels: TCG,
            timeout: Duration::from_secs(300),
            run: real_clients,
        },
        Scenario {
            name: "mux_error_replies_match_qemus",
            accels: TCG,
            timeout: Duration::from_secs(120),
            run: error_replies,
        },
        Scenario {
            name: "mux_cli_run_and_wrap_share_qmp",
            accels: TCG,
            timeout: Duration::from_secs(120),
            run: cli_share,
        },
    ]
}

/// QEMU's Python client: greeting, negotiation, ids of its own, a command's error, an event
/// caused by its own command and one caused by another client.
const PYTHON_CLIENT: &str = r#"
import asyncio, json, sys
from qemu.qmp import EventListener, ExecuteError, QMPClient

async def main(path):
    qmp = QMPClient("e2e")
    await qmp.connect(path)
    out = {"greeting": qmp.greeting._raw["QMP"]["version"]["qemu"]}
    out["status"] = await qmp.execute("query-status")
    try:
        await qmp.execute("no-such-command")
    except ExecuteError as err:
        out["error_class"] = err.error_class
    listener = EventListener()
    try:
        await qmp.execute("migrate-pause", oob=True)
    except ExecuteError as err:
        out["oob_error"] = err.error_class + ": " + str(err)
    with qmp.listen(listener):
        await qmp.execute("stop")
        async for event in listener:
            if event["event"] == "STOP":
                out["stop_event"] = True
                break
        await qmp.execute("cont")
        async for event in listener:
            if event["event"] == "RESUME":
                out["resume_event"] = True
                break
    await qmp.disconnect()
    print(json.dumps(out))

asyncio.run(asyncio.wait_for(main(sys.argv[1]), 60))
"#;

fn real_clients(ctx: &Ctx) -> Result<(), String> {
    let python = crate::bench::python::venv_python()?;
    let qmp_shell = python.with_file_name("qmp-shell");
    let socket = ctx.scratch.join("shared.sock");
    let sock = socket.to_str().ok_or("non-UTF-8 scratch path")?;
    let mut vm = MachineBuilder::new(&ctx.qemu)
        .machine_type("none")
        .args(ctx.accel_args())
        .share_qmp(
            ShareAddress::unix(&socket),
            MuxConfig::default().with_quit(QuitPolicy::Allow),
        )
        .build();
    vm.launch().map_err(|e| format!("launch: {e}"))?;
    let shared = vm.sharing().ok_or("the builder's sharing did not start")?;
    if shared.path != socket {
        return Err(format!("shared on {}", shared.path.display()));
    }

    // QEMU's Python client, while the machine resets QEMU and waits for each RESET.
    let script = ctx.scratch.join("mux_client.py");
    std::fs::write(&script, PYTHON_CLIENT).map_err(|e| e.to_string())?;
    let script_arg = script.to_str().ok_or("non-UTF-8 scratch path")?;
    let client = Proc::spawn_program(ctx, &python, &[script_arg, sock], None)?;
    let owner_rounds = owner_works_until(ctx, &mut vm, client)?;
    let py = owner_rounds.1.expect_code(0)?;
    let result: Value = py
        .json_lines()
        .into_iter()
        .next()
        .ok_or_else(|| format!("no JSON from the Python client: {:?}", py.stdout))?;
    if result["status"]["status"] != "running"
        || result["error_class"] != "CommandNotFound"
        || result["stop_event"] != true
        || result["resume_event"] != true
        || result["greeting"]["major"].as_u64().is_none()
        // QEMU answers this only out of band (in band: "does not support OOB"), so the
        // multiplexer passed exec-oob through.
        || !result["oob_error"]
            .as_str()
            .is_some_and(|e| e.contains("postcopy-active"))
    {
        return Err(format!("unexpected Python client result: {result}"));
    }
    ctx.note(format!(
        "qemu.qmp (Python) through the multiplexer: ok, while the machine ran {} reset+RESET rounds of its own",
        owner_rounds.0
    ));

    // qmp-shell, QEMU's interactive client, with its input piped.
    let shell = Proc::spawn_program(ctx, &qmp_shell, &[sock], Some("query-status\nquery-name\n"))?;
    let (rounds, shell) = owner_works_until(ctx, &mut vm, shell)?;
    let out = shell.stdout.join("\n");
    if !out.contains("running") || !out.contains("\"return\"") {
        return Err(format!(
            "qmp-shell output lacks query-status's reply: {out}; stderr: {:?}",
            shell.stderr
        ));
    }
    ctx.note(format!(
        "qmp-shell through the multiplexer: ok ({rounds} owner rounds meanwhile)"
    ));

    // Our own subcommands against the same path, like against QEMU.
    one_shot(ctx, &["qmp", sock, "query-status"], None)?.expect_code(0)?;
    typed_error_and_events(ctx, sock, sock)?;
    let shell = Proc::spawn(ctx, &["shell", sock], Some("query-status\nstop\n\ncont\n"))?;
    let (_, shell) = owner_works_until(ctx, &mut vm, shell)?;
    shell.expect_code(0)?;
    let out = shell.stdout.join("\n");
    for want in [r#""status":"running""#, " STOP", " RESUME"] {
        if !out.contains(want) {
            return Err(format!("shell output lacks {want}: {out}"));
        }
    }
    ctx.note("qemu-machine qmp, events and shell through the multiplexer: ok");

    // The machine's own commands are still fine; then a client quits (allowed) and the
    // report names it.
    vm.qmp("query-status", ())
        .map_err(|e| format!("the machine's own command: {e}"))?;
    if let Some(stats) = vm.sharing_stats() {
        ctx.note(format!(
            "multiplexer: {} clients, {} commands forwarded, {} answered itself",
            stats.clients_accepted, stats.commands_forwarded, stats.commands_answered
        ));
    }
    one_shot(ctx, &["qmp", sock, "quit"], None)?.expect_code(0)?;
    let report = vm
        .wait(Duration::from_secs(10))
        .map_err(|e| format!("wait after the client's quit: {e}"))?;
    match &report.ended_by {
        EndedBy::SharedClient { client } if client.contains("unix pid") => {
            ctx.note(format!("exit report: {}", report.ended_by));
        }
        other => return Err(format!("the report says {other}, not the client's quit")),
    }
    if socket.exists() {
        return Err("the shared socket outlived the machine".into());
    }
    Ok(())
}

/// Keeps the machine busy with its own commands and event waits (`system_reset`, then its
/// RESET event) until `client` exits; returns how many rounds ran and the client's result.
fn owner_works_until(
    ctx: &Ctx,
    vm: &mut Machine,
    mut client: Proc,
) -> Result<(u32, super::cli::Finished), String> {
    let mut rounds = 0;
    while client.running()? {
        if ctx.remaining().is_zero() {
            return Err("the client did not finish in time".into());
        }
        vm.qmp("query-status", ())
            .map_err(|e| format!("the machine's query-status: {e}"))?;
        vm.cmd("system_reset", ())
            .map_err(|e| format!("the machine's system_reset: {e}"))?;
        vm.event_wait("RESET", None, Duration::from_secs(5))
            .map_err(|e| format!("the machine's RESET wait: {e}"))?;
        rounds += 1;
    }
    Ok((rounds, client.finish(ctx)?))
}

/// `qemu-machine run --share-qmp PATH`: our own `qmp`, `shell` and `events` attach to the
/// monitor `run` owns, a file at the path is never replaced, a refused `quit` leaves QEMU
/// running, an allowed one ends it and the exit report names the client. `wrap
/// --share-qmp` shares too.
fn cli_share(ctx: &Ctx) -> Result<(), String> {
    let accel = ctx.accel.as_str();
    // A regular file at the path is refused, and left alone.
    let file = ctx.scratch.join("taken");
    std::fs::write(&file, "user data").map_err(|e| e.to_string())?;
    let taken = file.to_str().ok_or("non-UTF-8 scratch path")?;
    let refused = one_shot(
        ctx,
        &[
            "run",
            "--accel",
            accel,
            "--share-qmp",
            taken,
            "--",
            "-M",
            "none",
        ],
        None,
    )?;
    if refused.status.success()
        || std::fs::read_to_string(&file).ok().as_deref() != Some("user data")
    {
        return Err(format!(
            "run --share-qmp on a regular file: {:?}, {:?}",
            refused.status, refused.stderr
        ));
    }
    let socket = ctx.scratch.join("run.sock");
    let sock = socket.to_str().ok_or("non-UTF-8 scratch path")?;
    let run_args = [
        "run",
        "--accel",
        accel,
        "--shutdown-timeout",
        "1s",
        "--share-qmp",
        sock,
        "--share-allow-quit",
        "--",
        "-M",
        "none",
    ];
    let mut vm = Proc::spawn(ctx, &run_args, None)?;
    vm.wait_stderr(ctx, |l| l.contains("QMP clients can attach to our monitor"))?;
    let status = one_shot(ctx, &["qmp", sock, "query-status"], None)?;
    status.expect_code(0)?;
    let shell = one_shot(ctx, &["shell", sock], Some("query-status\nquery-name\n"))?;
    shell.expect_code(0)?;
    if !shell.stdout.join("\n").contains(r#""status":"running""#) {
        return Err(format!("shell through run's monitor: {:?}", shell.stdout));
    }
    let mut events = Proc::spawn(ctx, &["events", sock, "--json", "--count", "1"], None)?;
    events.wait_stderr(ctx, |l| l.contains("streaming events"))?;
    one_shot(ctx, &["qmp", sock, "stop"], None)?.expect_code(0)?;
    events.finish(ctx)?.expect_code(0)?;
    one_shot(ctx, &["qmp", sock, "quit"], None)?.expect_code(0)?;
    let ended = vm.finish(ctx)?;
    ended.expect_code(0)?;
    if !ended
        .stderr
        .iter()
        .any(|l| l.contains("on a request from QMP client"))
    {
        return Err(format!(
            "run's exit report does not name the client: {:?}",
            ended.stderr
        ));
    }
    if socket.exists() {
        return Err("run left its shared socket behind".into());
    }
    // wrap shares the same way (its own shell on stdin, then quit).
    let wrapped = ctx.scratch.join("wrap.sock");
    let wrap_sock = wrapped.to_str().ok_or("non-UTF-8 scratch path")?;
    let done = one_shot(
        ctx,
        &[
            "wrap",
            "--share-qmp",
            wrap_sock,
            "--",
            "-M",
            "none",
            "-accel",
            accel,
        ],
        Some("query-status\nquit\n"),
    )?;
    done.expect_code(0)?;
    if !done
        .stderr
        .iter()
        .any(|l| l.contains("QMP clients can attach to"))
    {
        return Err(format!(
            "wrap did not say where it shares: {:?}",
            done.stderr
        ));
    }
    if wrapped.exists() {
        return Err("wrap left its shared socket behind".into());
    }
    ctx.note("run --share-qmp: qmp, shell, events attached; the client's quit is in the exit report; wrap --share-qmp: ok");
    Ok(())
}

/// Inputs sent to the multiplexer and to a monitor of QEMU's own, each on a fresh connection
/// (`None`: before negotiation; `Some(oob)`: after negotiating with or without `oob`). The
/// replies must be the same JSON.
const ERROR_CASES: &[(Option<bool>, &str)] = &[
    (
        None,
        r#"{"execute":"query-status","id":{"a":[1,2.5,null]}}"#,
    ),
    (
        None,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["x"]},"id":2}"#,
    ),
    (
        None,
        r#"{"execute":"qmp_capabilities","arguments":{"bar":1},"id":3}"#,
    ),
    (
        None,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":[1]},"id":4}"#,
    ),
    (None, r#"{"exec-oob":"qmp_capabilities","id":5}"#),
    (None, "garbage\n"),
    (Some(true), "garbage\n"),
    (Some(true), r#"{"execute":}"#),
    (Some(true), "[1,2]"),
    (Some(true), "42\n"),
    (Some(true), "\"str\"\n"),
    (Some(true), "{}"),
    (Some(true), r#"{"id":5}"#),
    (Some(true), r#"{"execute":5,"id":6}"#),
    (Some(true), r#"{"execute":"query-status","foo":1,"id":7}"#),
    (
        Some(true),
        r#"{"execute":"query-status","arguments":{},"foo":1,"zzz":2,"id":8}"#,
    ),
    (
        Some(true),
        r#"{"execute":"query-status","arguments":[],"id":9}"#,
    ),
    (Some(true), r#"{"exec-oob":"query-status","id":10}"#),
    (
        Some(true),
        r#"{"exec-oob":"query-status","execute":"x","id":11}"#,
    ),
    (Some(false), r#"{"exec-oob":"query-status","id":12}"#),
    (Some(true), r#"{"execute":"nonexistent","id":"n"}"#),
    (Some(true), r#"{"execute":"qmp_capabilities","id":13}"#),
    (
        Some(true),
        r#"{"execute":"qmp_capabilities","arguments":{"enable":[1]},"id":14}"#,
    ),
    (
        Some(true),
        r#"{"execute":"query-status","arguments":{"x":1},"id":null}"#,
    ),
    (
        Some(true),
        r#"{"execute":"query-name","id":[true,{"k":"v"}]}"#,
    ),
    (Some(true), r#"{"execute":"query-name"}"#),
];

/// QEMU's own error replies beside the multiplexer's for the same bad input.
fn error_replies(ctx: &Ctx) -> Result<(), String> {
    let direct = ctx.scratch.join("direct.sock");
    let direct_arg = format!("unix:{},server=on,wait=off", direct.display());
    let mut vm = MachineBuilder::new(&ctx.qemu)
        .machine_type("none")
        .args(ctx.accel_args())
        .args(["-qmp", &direct_arg])
        .share_qmp(ShareAddress::default(), MuxConfig::default())
        .build();
    vm.launch().map_err(|e| format!("launch: {e}"))?;
    let result = compare_error_replies(ctx, &mut vm, &direct);
    // QEMU leaves its own listening socket behind when it is killed.
    let _ = std::fs::remove_file(&direct);
    result
}

fn compare_error_replies(
    ctx: &Ctx,
    vm: &mut Machine,
    direct: &std::path::Path,
) -> Result<(), String> {
    let shared = vm.sharing().map(|s| s.path.clone()).ok_or("not shared")?;
    let (mut same, mut positioned) = (0, 0);
    for (negotiate, input) in ERROR_CASES {
        let what = |e: String| format!("{input:?} (negotiated: {negotiate:?}): {e}");
        let ours = ask(&shared, *negotiate, input, 1).map_err(what)?.remove(0);
        let qemus = ask(direct, *negotiate, input, 1).map_err(what)?.remove(0);
        if ours == qemus {
            same += 1;
        } else if without_position(&qemus) == ours {
            // Measured: QEMU 11.1 starts a JSON parse error with the line and column of the
            // bad token ("1:1: JSON parse error, ..."); 7.2 and 10.0 do not, and neither does
            // the multiplexer yet. Counted and reported, not hidden.
            positioned += 1;
        } else {
            return Err(format!(
                "{input:?} (negotiated: {negotiate:?}): the multiplexer said {ours}, QEMU {qemus}"
            ));
        }
    }
    ctx.note(format!(
        "{same} of {} bad or odd inputs: the multiplexer's replies equal QEMU {}'s",
        ERROR_CASES.len(),
        ctx.qemu_version
    ));
    // Pipelined behind a slow command, bad input is answered in turn, after that command's
    // reply: by QEMU, and so by the multiplexer.
    let ours = ask(&shared, Some(false), PIPELINED, 4)?;
    let qemus: Vec<Value> = ask(direct, Some(false), PIPELINED, 4)?
        .iter()
        .map(without_position)
        .collect();
    let shape = |replies: &[Value]| -> Vec<String> {
        replies
            .iter()
            .map(|r| {
                let id = r.get("id").map_or("none".to_owned(), Value::to_string);
                match r["error"]["desc"].as_str() {
                    Some(desc) => format!("error `{desc}`, id {id}"),
                    None => format!("return, id {id}"),
                }
            })
            .collect()
    };
    if shape(&ours) != shape(&qemus) || ours != qemus {
        return Err(format!(
            "pipelined input: the multiplexer answered {:?}, QEMU {:?}",
            shape(&ours),
            shape(&qemus)
        ));
    }
    ctx.note(format!(
        "pipelined behind a schema request, garbage is answered in turn by both: {:?}",
        shape(&ours)
    ));
    if positioned > 0 {
        ctx.note(format!(
            "{positioned} JSON parse errors differ only by QEMU's `line:column: ` prefix, which the multiplexer does not write"
        ));
    }
    vm.shutdown().map_err(|e| format!("shutdown: {e}"))?;
    Ok(())
}

/// QEMU's error reply with the `line:column: ` prefix of newer JSON parse errors removed.
fn without_position(reply: &Value) -> Value {
    let mut reply = reply.clone();
    if let Some(desc) = reply["error"]["desc"].as_str() {
        if let Some((position, rest)) = desc.split_once(": ") {
            let numeric = position
                .split(':')
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if numeric && position.contains(':') && rest.starts_with("JSON parse error") {
                reply["error"]["desc"] = Value::from(rest);
            }
        }
    }
    reply
}

/// A slow command, garbage, a quick command and a non-object, sent at once.
const PIPELINED: &str =
    "{\"execute\":\"query-qmp-schema\",\"id\":1}garbage\n{\"execute\":\"query-name\",\"id\":2}[1]\n";

/// One fresh connection: the greeting, negotiation if asked, `input`, and the first `n`
/// replies.
fn ask(
    path: &std::path::Path,
    negotiate: Option<bool>,
    input: &str,
    n: usize,
) -> Result<Vec<Value>, String> {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| format!("connect {}: {e}", path.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    let mut line = String::new();
    let mut read =
        |reader: &mut BufReader<std::os::unix::net::UnixStream>| -> Result<Value, String> {
            line.clear();
            reader
                .read_line(&mut line)
                .map_err(|e| format!("no reply from {}: {e}", path.display()))?;
            serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))
        };
    read(&mut reader)?;
    if let Some(oob) = negotiate {
        let caps: &[u8] = if oob {
            br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#
        } else {
            br#"{"execute":"qmp_capabilities"}"#
        };
        writer.write_all(caps).map_err(|e| e.to_string())?;
        read(&mut reader)?;
    }
    writer
        .write_all(input.as_bytes())
        .map_err(|e| e.to_string())?;
    (0..n).map(|_| read(&mut reader)).collect()
}
