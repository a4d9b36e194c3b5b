//! `agent/ping`: a `guest-ping` round trip through qmp-client's guest-agent client
//! (`qmp_client::Agent`) to QEMU's guest agent in the Linux test guest, beside the same bytes
//! written and read by a raw loop on the same ISA-serial channel, in alternating rounds. The
//! channel is a UART, so both sides are dominated by the guest's serial path; the figure shows
//! what the client adds on top. Target: at most 1.1x the raw loop.

use std::time::{Duration, Instant};

use machine_core::console_socket::Pattern;
use machine_core::linux::{PROMPT, READY_LINE};
use machine_core::qmp_client::{Agent, AgentConfig};
use machine_core::MachineBuilder;

use crate::e2e::linux::{agent_channel, raw_ping};

use super::{measure, Cpu, Figure, Settings, Target};

/// Measures the round trip, if `settings` selects it.
pub fn run(settings: &Settings) -> Result<Vec<Figure>, String> {
    let mut figure = Figure::new(
        "agent/ping",
        "guest agent round trip (`guest-ping`, ISA serial)",
        "us",
        "machine_core::qmp_client::Agent",
        "raw loop on the same channel",
        Target::RatioAtMost(1.1),
    );
    if !settings.wants(&figure.id, &figure.name) {
        return Ok(Vec::new());
    }
    let (rounds, per_round) = settings.pick((15, 20), (3, 5));
    let guest = crate::qemu::ensure_linux_guest()?;
    let mut builder = MachineBuilder::new(crate::qemu::binary());
    builder
        .machine_type("q35")
        .console()
        .base_temp_dir(&settings.scratch)
        .args(guest.qemu_args());
    // The channel by hand, as the e2e scenario does: the raw loop and the client share it.
    let ours = agent_channel(&mut builder)?;
    let mut vm = builder.build();
    let started = Instant::now();
    vm.launch()
        .map_err(|e| format!("launch the Linux guest: {e}"))?;
    let boot_timeout = Duration::from_secs(120);
    let console = vm.console().map_err(|e| format!("console: {e}"))?;
    for wanted in [READY_LINE, PROMPT] {
        console
            .wait_for(&Pattern::substring(wanted), boot_timeout)
            .map_err(|e| format!("waiting for {wanted:?}: {e}"))?;
    }
    let ready = started.elapsed();
    let raw = ours.try_clone().map_err(|e| format!("dup: {e}"))?;
    let config = AgentConfig::default().with_command_timeout(Duration::from_secs(10));
    let mut agent = Agent::from_unix_stream(ours, &config).map_err(|e| format!("agent: {e}"))?;
    agent.ping().map_err(|e| format!("first ping: {e}"))?;
    let raw_block = |n: usize| -> Result<(), String> {
        for _ in 0..n {
            raw_ping(&raw)?;
        }
        Ok(())
    };
    let ours_block = |agent: &mut Agent, n: usize| -> Result<(), String> {
        for _ in 0..n {
            agent.ping().map_err(|e| format!("guest-ping: {e}"))?;
        }
        Ok(())
    };
    for round in 0..rounds {
        for raw_side in [round % 2 == 0, round % 2 == 1] {
            if raw_side {
                let (result, wall, cpu) = measure(Cpu::thread, || raw_block(per_round));
                result?;
                figure
                    .baseline
                    .push(us_per(wall, per_round), cpu, per_round);
            } else {
                let (result, wall, cpu) =
                    measure(Cpu::thread, || ours_block(&mut agent, per_round));
                result?;
                figure.ours.push(us_per(wall, per_round), cpu, per_round);
            }
        }
    }
    drop(agent);
    vm.kill()
        .map_err(|e| format!("kill the Linux guest: {e}"))?;
    figure.notes.push(format!(
        "{rounds} rounds of {per_round} pings per side; Linux guest (q35, qboot, TCG) ready {:.1} s after exec",
        ready.as_secs_f64()
    ));
    Ok(vec![figure])
}

fn us_per(wall: Duration, ops: usize) -> f64 {
    wall.as_secs_f64() * 1e6 / ops.max(1) as f64
}
