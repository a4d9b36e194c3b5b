//! The real-QEMU end-to-end suite: every scenario runs against `qemu-system-x86_64`.
//!
//! Each area of the workspace adds its scenarios in its own module (`client`, `console`,
//! `machine`, `cli`, `qtest`) by returning them from `scenarios()`.

mod cli;
mod client;
mod console;
mod machine;
mod qtest;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// An accelerator a scenario can run under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: the default, fast for our tiny guest.
    Tcg,
    /// KVM (nested and slow for firmware on our machines): opt-in.
    Kvm,
}

impl Accel {
    /// The value for QEMU's `-accel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// What a scenario gets to work with.
pub struct Ctx {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The accelerator this run uses.
    pub accel: Accel,
    /// The scenario's deadline: every wait inside must end before it.
    pub deadline: Instant,
}

/// One end-to-end test.
pub struct Scenario {
    /// Unique name, printed on its result line.
    pub name: &'static str,
    /// The accelerators it is meaningful under.
    pub accels: &'static [Accel],
    /// How long it may take in total.
    pub timeout: Duration,
    /// The test body: Err describes the failure.
    pub run: fn(&Ctx) -> Result<(), String>,
}

/// Runs the suite; Err if any scenario failed.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut filter: Option<String> = None;
    let mut accels = vec![Accel::Tcg];
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--filter" => filter = it.next().cloned(),
            "--accel" => {
                accels = match it.next().map(String::as_str) {
                    Some("tcg") => vec![Accel::Tcg],
                    Some("kvm") => vec![Accel::Kvm],
                    Some("both") => vec![Accel::Tcg, Accel::Kvm],
                    other => return Err(format!("--accel takes tcg, kvm or both, not {other:?}")),
                }
            }
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    crate::qemu::ensure_installed()?;
    let qemu = crate::qemu::binary();
    let mut all = Vec::new();
    all.extend(client::scenarios());
    all.extend(console::scenarios());
    all.extend(machine::scenarios());
    all.extend(cli::scenarios());
    all.extend(qtest::scenarios());
    let (mut passed, mut failed) = (0usize, 0usize);
    for scenario in &all {
        if filter
            .as_deref()
            .is_some_and(|f| !scenario.name.contains(f))
        {
            continue;
        }
        for &accel in accels.iter().filter(|a| scenario.accels.contains(a)) {
            let started = Instant::now();
            let ctx = Ctx {
                qemu: qemu.clone(),
                accel,
                deadline: started + scenario.timeout,
            };
            let outcome = (scenario.run)(&ctx);
            let ms = started.elapsed().as_millis();
            match outcome {
                Ok(()) => {
                    passed += 1;
                    eprintln!("pass {} [{}] {ms} ms", scenario.name, accel.as_str());
                }
                Err(why) => {
                    failed += 1;
                    eprintln!("FAIL {} [{}] {ms} ms: {why}", scenario.name, accel.as_str());
                }
            }
        }
    }
    eprintln!("e2e: {passed} passed, {failed} failed");
    if failed == 0 {
        Ok(())
    } else {
        Err(format!("{failed} end-to-end scenarios failed"))
    }
}
