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
        ("e2e", Box::new(|| crate::e2e::run(&[]))),
        (
            "e2e 10.0",
            Box::new(|| crate::e2e::run(&["--qemu".to_string(), "10.0".to_string()])),
        ),
        (
            "e2e 11.1",
            Box::new(|| crate::e2e::run(&["--qemu".to_string(), "11.1".to_string()])),
        ),
        (
            "fuzz",
            Box::new(|| crate::fuzz::run(&["--seconds".to_string(), "5".to_string()])),
        ),
        (
            "reliability",
            Box::new(|| quick("reliability", crate::reliability::run)),
        ),
        // Keeps every benchmark running; the timings of a shared CI machine are not judged.
        ("bench", Box::new(|| quick("bench", crate::bench::run))),
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
fn quick(name: &str, run: fn(&[String]) -> Result<(), String>) -> Result<(), String> {
    let json = crate::workspace_root().join(format!("target/{name}-quick.json"));
    run(&[
        "--quick".to_string(),
        "--json".to_string(),
        json.to_string_lossy().into_owned(),
    ])
}
