//! `qtest/roundtrip`: a qtest command (`inl 0xcfc`, a port read) through machine-core's
//! `QtestProtocol`, beside the same bytes over a plain blocking socket (one write, one line
//! read), on the same QEMU (`-M pc -S`, TCG) in alternating rounds. In release mode, unlike
//! the e2e scenario that checks it in a debug build. Target: at most 1.1x the raw socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use machine_core::qtest::{Config, QtestProtocol};

use crate::e2e::{socketpair, QemuCommand};

use super::{measure, Cpu, Figure, Settings, Target};

const LINE: &str = "inl 0xcfc";

/// Measures the round trip, if `settings` selects it.
pub fn run(settings: &Settings) -> Result<Vec<Figure>, String> {
    let mut figure = Figure::new(
        "qtest/roundtrip",
        "qtest round trip (`inl 0xcfc`)",
        "us",
        "machine_core::qtest::QtestProtocol",
        "raw blocking socket",
        Target::RatioAtMost(1.1),
    );
    if !settings.wants(&figure.id, &figure.name) {
        return Ok(Vec::new());
    }
    let (rounds, per_round) = settings.pick((20, 200), (3, 20));
    let (ours, theirs) = socketpair()?;
    let mut cmd = QemuCommand::new(
        crate::qemu::binary(),
        settings.scratch.join("qemu-qtest.log"),
    );
    let fd = cmd.pass_fd(theirs);
    cmd.args([
        "-nodefaults",
        "-display",
        "none",
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-S",
    ])
    .args(["-chardev", &format!("socket,id=qtest,fd={fd}")])
    .args(["-qtest", "chardev:qtest", "-qtest-log", "/dev/null"]);
    let mut qemu = cmd.spawn()?;
    // The raw side shares the socket; it switches it to blocking for its rounds (the flag
    // belongs to the shared file description) and back for the client's.
    let raw = ours.try_clone().map_err(|e| format!("dup: {e}"))?;
    raw.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    let mut reader = BufReader::new(raw.try_clone().map_err(|e| format!("dup: {e}"))?);
    let mut q = QtestProtocol::from_unix_stream(ours, Config::default())
        .map_err(|e| format!("qtest: {e}"))?;
    let mut reply = String::new();
    let mut raw_block = |n: usize| -> Result<(), String> {
        raw.set_nonblocking(false)
            .map_err(|e| format!("set_nonblocking: {e}"))?;
        for _ in 0..n {
            raw_roundtrip(&raw, &mut reader, &mut reply)?;
        }
        raw.set_nonblocking(true)
            .map_err(|e| format!("set_nonblocking: {e}"))
    };
    let ours_block = |q: &mut QtestProtocol, n: usize| -> Result<(), String> {
        for _ in 0..n {
            q.command(LINE).map_err(|e| format!("{LINE}: {e}"))?;
        }
        Ok(())
    };
    raw_block(per_round)?;
    ours_block(&mut q, per_round)?;
    for round in 0..rounds {
        for raw_side in [round % 2 == 0, round % 2 == 1] {
            if raw_side {
                let (result, wall, cpu) = measure(Cpu::thread, || raw_block(per_round));
                result?;
                figure
                    .baseline
                    .push(us_per(wall, per_round), cpu, per_round);
            } else {
                let (result, wall, cpu) = measure(Cpu::thread, || ours_block(&mut q, per_round));
                result?;
                figure.ours.push(us_per(wall, per_round), cpu, per_round);
            }
        }
    }
    drop(q);
    let status = qemu.kill()?;
    log::debug!("qtest QEMU ended: {status}");
    figure.notes.push(format!(
        "{rounds} rounds of {per_round} round trips per side, one QEMU -M pc -S (tcg)"
    ));
    Ok(vec![figure])
}

fn us_per(wall: Duration, ops: usize) -> f64 {
    wall.as_secs_f64() * 1e6 / ops.max(1) as f64
}

/// One write, one blocking line read.
fn raw_roundtrip(
    raw: &UnixStream,
    reader: &mut BufReader<UnixStream>,
    reply: &mut String,
) -> Result<(), String> {
    let mut writer = raw;
    writer
        .write_all(b"inl 0xcfc\n")
        .map_err(|e| format!("raw write: {e}"))?;
    reply.clear();
    reader
        .read_line(reply)
        .map_err(|e| format!("raw read: {e}"))?;
    if reply.starts_with("OK") {
        Ok(())
    } else {
        Err(format!("raw reply {reply:?}"))
    }
}
