//! `cargo xtask ci`: the one command that checks everything, with a summary at the end.

use std::time::Instant;

use crate::cargo;

/// The workspace's crates, each tested alone by the `alone` step.
pub(crate) const CRATES: &[&str] = &[
    "qmp-proto",
    "qmp-client",
    "console-socket",
    "machine-core",
    "machine-cli",
    "xtask",
];

/// Runs every CI step, even after a failure, then prints a summary; Err if any step failed.
pub fn run(args: &[String]) -> Result<(), String> {
    if let Some(extra) = args.first() {
        return Err(format!("unexpected argument `{extra}`"));
    }
    type Step = (&'static str, Box<dyn Fn() -> Result<(), String>>);
    let steps: Vec<Step> = vec![
        ("fmt", Box::new(|| cargo(&["fmt", "--all", "--check"], &[]))),
        ("tidy", Box::new(|| crate::tidy::run(&[]))),
        ("catalogue", Box::new(|| crate::catalogue::run(&[]))),
        (
            "clippy",
            Box::new(|| {
                cargo(
                    &[
                        "clippy",
                        "--workspace",
                        "--all-targets",
                        "--all-features",
                        "--",
                        "-D",
                        "warnings",
                    ],
                    &[],
                )
            }),
        ),
        (
            "doc",
            Box::new(|| {
                cargo(
                    &["doc", "--workspace", "--no-deps", "--all-features"],
                    &[("RUSTDOCFLAGS", "-D warnings")],
                )
            }),
        ),
        (
            "test",
            Box::new(|| cargo(&["test", "--workspace", "--all-features"], &[])),
        ),
        (
            "alone",
            Box::new(|| {
                // Each crate's tests on their own, with only the features the crate itself
                // asks for: a test that compiles only thanks to another crate's features
                // fails here.
                for krate in CRATES {
                    cargo(&["test", "-p", krate], &[])?;
                }
                Ok(())
            }),
        ),
        // The suites run as `cargo xtask ...` would, each in a fresh process: what one step
        // leaves in this process (threads, the allocator's state) must not change the next
        // step's figures (max-message's peak memory measured 27.9 MiB here after the other
        // steps, 20.3 MiB on its own).
        ("e2e", Box::new(|| xtask(&["e2e"]))),
        ("e2e 10.0", Box::new(|| xtask(&["e2e", "--qemu", "10.0"]))),
        ("e2e 11.1", Box::new(|| xtask(&["e2e", "--qemu", "11.1"]))),
        (
            "fuzz",
            Box::new(|| crate::fuzz::run(&["--seconds".to_string(), "5".to_string()])),
        ),
        ("reliability", Box::new(|| quick("reliability"))),
        // Keeps every benchmark running; the timings of a shared CI machine are not judged.
        ("bench", Box::new(|| quick("bench"))),
    ];
    let mut results = Vec::new();
    for (name, step) in &steps {
        eprintln!("==> xtask ci: {name}");
        let started = Instant::now();
        let outcome = step();
        if let Err(message) = &outcome {
            eprintln!("==> xtask ci: {name} FAILED: {message}");
        }
        results.push((*name, outcome.is_ok(), started.elapsed()));
    }
    eprintln!("\nxtask ci summary:");
    for (name, ok, elapsed) in &results {
        let verdict = if *ok { "ok  " } else { "FAIL" };
        eprintln!("  {verdict} {name:<11} {:>7.1} s", elapsed.as_secs_f64());
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(name, _, _)| *name)
        .collect();
    if failed.is_empty() {
        eprintln!("all {} steps passed", results.len());
        Ok(())
    } else {
        Err(format!("failed steps: {}", failed.join(", ")))
    }
}

/// Runs a task's `--quick` mode, its JSON report going to `target/NAME-quick.json`.
fn quick(name: &str) -> Result<(), String> {
    let json = crate::workspace_root().join(format!("target/{name}-quick.json"));
    xtask(&[name, "--quick", "--json", &json.to_string_lossy()])
}

/// Runs `xtask ARGS` (this same binary) in a fresh process, its output going to ours.
fn xtask(args: &[&str]) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the xtask binary: {e}"))?;
    let status = std::process::Command::new(&exe)
        .args(args)
        .current_dir(crate::workspace_root())
        .status()
        .map_err(|e| format!("cannot run {} {}: {e}", exe.display(), args.join(" ")))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("xtask {} failed: {status}", args.join(" ")))
    }
}
