//! Figure "bad-launch matrix": 100 distinct bad-argument launches, each of which must fail
//! fast with `Error::LaunchFailed` carrying QEMU's exit code and an output tail that names the
//! problem, with nothing left behind.

use std::time::{Duration, Instant};

use machine_core::{Error, ExitStatus};
use serde_json::json;

use super::{chain, Figure, Settings, Stats};

/// Variants generated per kind of mistake.
const PER_KIND: usize = 5;

/// One bad launch: a label, the arguments, the machine type (None: the arguments carry their
/// own), whether to add `-accel tcg`, and text QEMU's output must contain.
struct Case {
    label: String,
    args: Vec<String>,
    machine: Option<&'static str>,
    tcg: bool,
    needle: String,
}

fn case(label: String, args: Vec<String>, needle: String) -> Case {
    Case {
        label,
        args,
        machine: Some("none"),
        tcg: true,
        needle,
    }
}

/// The matrix: 20 kinds of mistake times [`PER_KIND`] distinct values.
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for i in 1..=PER_KIND {
        out.push(case(
            format!("invalid -device #{i}"),
            vec!["-device".into(), format!("no-such-device-{i}")],
            format!("no-such-device-{i}"),
        ));
        let disk = format!("/nonexistent/reliability-{i}/disk.img");
        out.push(case(
            format!("missing -drive file #{i}"),
            vec!["-drive".into(), format!("file={disk},format=raw,if=none")],
            disk,
        ));
        out.push(Case {
            label: format!("bad -machine #{i}"),
            args: vec!["-machine".into(), format!("no-such-machine-{i}")],
            machine: None,
            tcg: true,
            needle: "unsupported machine type".into(),
        });
        out.push(case(
            format!("unknown option #{i}"),
            vec![format!("-no-such-option-{i}")],
            format!("-no-such-option-{i}: invalid option"),
        ));
        out.push(case(
            format!("bad -m #{i}"),
            vec!["-m".into(), format!("{i}zz")],
            format!("-m {i}zz"),
        ));
        out.push(Case {
            label: format!("bad -accel #{i}"),
            args: vec!["-accel".into(), format!("no-such-accel-{i}")],
            machine: Some("none"),
            tcg: false,
            needle: format!("invalid accelerator no-such-accel-{i}"),
        });
        out.push(case(
            format!("bad -chardev #{i}"),
            vec!["-chardev".into(), format!("no-such-backend-{i},id=c{i}")],
            format!("'no-such-backend-{i}' is not a valid char driver"),
        ));
        let kernel = format!("/nonexistent/reliability-kernel-{i}");
        out.push(Case {
            label: format!("missing -kernel file #{i}"),
            args: vec!["-kernel".into(), kernel.clone()],
            machine: Some("q35"),
            tcg: true,
            needle: format!("could not open kernel file '{kernel}'"),
        });
        out.push(case(
            format!("bad -smp #{i}"),
            vec!["-smp".into(), format!("cpus{i}")],
            "smp.cpus".into(),
        ));
        out.push(case(
            format!("bad -object #{i}"),
            vec!["-object".into(), format!("no-such-object-{i},id=o{i}")],
            format!("no-such-object-{i}"),
        ));
        out.push(case(
            format!("bad -netdev #{i}"),
            vec!["-netdev".into(), format!("no-such-netdev-{i},id=n{i}")],
            format!("no-such-netdev-{i}"),
        ));
        out.push(case(
            format!("bad -cpu #{i}"),
            vec!["-cpu".into(), format!("no-such-cpu-{i}")],
            format!("no-such-cpu-{i}"),
        ));
        let blk = format!("/nonexistent/reliability-blockdev-{i}");
        out.push(case(
            format!("missing -blockdev file #{i}"),
            vec![
                "-blockdev".into(),
                format!("driver=file,filename={blk},node-name=b{i}"),
            ],
            blk,
        ));
        let cfg = format!("/nonexistent/reliability-{i}.cfg");
        out.push(case(
            format!("missing -readconfig file #{i}"),
            vec!["-readconfig".into(), cfg.clone()],
            cfg,
        ));
        out.push(case(
            format!("-mon on a missing chardev #{i}"),
            vec!["-mon".into(), format!("chardev=no-such-chardev-{i}")],
            format!("no-such-chardev-{i}"),
        ));
        out.push(case(
            format!("bad -serial #{i}"),
            vec!["-serial".into(), format!("no-such-serial-{i}")],
            format!("no-such-serial-{i}"),
        ));
        out.push(case(
            format!("bad -name key #{i}"),
            vec!["-name".into(), format!("guest=a,no-such-key-{i}=2")],
            format!("no-such-key-{i}"),
        ));
        out.push(case(
            format!("bad -numa #{i}"),
            vec!["-numa".into(), format!("node,nodeid=bad{i}")],
            "nodeid".into(),
        ));
        out.push(case(
            format!("-add-fd of a closed fd #{i}"),
            vec!["-add-fd".into(), format!("fd={},set={i}", 90 + i)],
            "fd is not valid".into(),
        ));
        out.push(case(
            format!("bad -rtc #{i}"),
            vec!["-rtc".into(), format!("base=bad-date-{i}")],
            "invalid datetime format".into(),
        ));
    }
    out
}

/// Runs the matrix.
pub fn run(settings: &Settings) -> Figure {
    let mut figure = Figure::new("bad-launch");
    let cases = cases();
    let distinct: std::collections::BTreeSet<(Option<&str>, bool, &Vec<String>)> =
        cases.iter().map(|c| (c.machine, c.tcg, &c.args)).collect();
    let mut times: Vec<Duration> = Vec::new();
    let mut typed = 0usize;
    let mut with_code = 0usize;
    let mut mentions = 0usize;
    let mut problems: Vec<String> = Vec::new();
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for c in &cases {
        let mut builder = machine_core::MachineBuilder::new(&settings.qemu);
        builder
            .base_temp_dir(settings.temp_base())
            .greeting_timeout(Duration::from_secs(10))
            .arg("-nodefaults");
        if let Some(machine) = c.machine {
            builder.machine_type(machine);
        }
        if c.tcg {
            builder.args(["-accel", "tcg"]);
        }
        builder.args(&c.args);
        let mut vm = builder.build();
        let t0 = Instant::now();
        let result = vm.launch();
        let elapsed = t0.elapsed();
        times.push(elapsed);
        match result {
            Err(Error::LaunchFailed {
                status,
                killed,
                output,
                ..
            }) => {
                typed += 1;
                let code = status.and_then(ExitStatus::code);
                *codes
                    .entry(status.map_or("none".into(), |s| s.to_string()))
                    .or_default() += 1;
                if code.is_some_and(|c| c != 0) && !killed {
                    with_code += 1;
                } else {
                    problems.push(format!("{}: status {status:?}, killed {killed}", c.label));
                }
                if output.contains(&c.needle) {
                    mentions += 1;
                } else {
                    problems.push(format!(
                        "{}: output does not mention {:?}: {:?}",
                        c.label,
                        c.needle,
                        output.chars().take(300).collect::<String>()
                    ));
                }
            }
            Err(other) => {
                problems.push(format!("{}: not LaunchFailed: {}", c.label, chain(&other)))
            }
            Ok(()) => {
                problems.push(format!("{}: launched", c.label));
                let _ = vm.kill();
            }
        }
        drop(vm);
    }
    let n = cases.len();
    let stats = Stats::of(&times);
    figure.check(
        "distinct bad-argument launches",
        ">= 100",
        distinct.len().to_string(),
        distinct.len() >= 100,
    );
    figure.check(
        "typed Error::LaunchFailed",
        format!("{n}/{n}"),
        format!("{typed}/{n}"),
        typed == n,
    );
    figure.check(
        "with QEMU's exit code (not killed)",
        format!("{n}/{n}"),
        format!("{with_code}/{n}"),
        with_code == n,
    );
    figure.check(
        "output tail mentions the problem",
        format!("{n}/{n}"),
        format!("{mentions}/{n}"),
        mentions == n,
    );
    figure.check(
        "launch->error time",
        "median < 1 s",
        stats.to_string(),
        stats.n == n && stats.median_ms < 1000.0,
    );
    figure.detail("time", stats.to_json());
    figure.detail("statuses", json!(codes));
    figure.detail("problems", json!(problems));
    for p in problems.iter().take(5) {
        figure.note(p.clone());
    }
    figure
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_has_100_distinct_cases_each_with_a_needle() {
        let cases = cases();
        assert_eq!(cases.len(), 100);
        let distinct: std::collections::BTreeSet<_> = cases
            .iter()
            .map(|c| (c.machine, c.tcg, c.args.clone()))
            .collect();
        assert_eq!(distinct.len(), 100);
        let labels: std::collections::BTreeSet<_> = cases.iter().map(|c| &c.label).collect();
        assert_eq!(labels.len(), 100);
        assert!(cases.iter().all(|c| !c.needle.is_empty()));
    }
}
