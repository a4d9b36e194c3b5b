//! `cargo xtask fuzz --seconds N [--target NAME]`: runs the cargo-fuzz targets of `fuzz/`,
//! N seconds each, and prints the executions of each.
//!
//! cargo-fuzz needs nightly compiler flags; on a stable toolchain they are unlocked with
//! `RUSTC_BOOTSTRAP=1`. The targets run without a sanitizer (the code they reach keeps its
//! unsafe to a few `sys` modules; see `fuzz/README.md`), with libFuzzer's RSS limit and
//! per-input timeout. cargo-fuzz itself is installed with `cargo install cargo-fuzz` when
//! missing. The corpus grows in `fuzz/corpus/` (not in git), starting from the corpus
//! files in `fuzz/seeds/`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::workspace_root;

/// The fuzz targets, in the order they run.
pub const TARGETS: [&str; 7] = [
    "decoder",
    "message",
    "session",
    "console_ring",
    "argv",
    "shell_line",
    "agent",
];

/// What one run achieved, read from libFuzzer's final statistics.
#[derive(Debug, Default)]
struct Stats {
    executions: Option<u64>,
    per_second: Option<u64>,
    peak_rss_mb: Option<u64>,
    corpus_units: Option<u64>,
}

/// Runs every fuzz target (or the one given) for the given number of seconds.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut seconds: u64 = 60;
    let mut only: Option<String> = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = rest.next().ok_or("--seconds needs a value")?;
                seconds = value
                    .parse()
                    .map_err(|_| format!("--seconds: `{value}` is not a whole number"))?;
            }
            "--target" => {
                let value = rest.next().ok_or("--target needs a value")?;
                if !TARGETS.contains(&value.as_str()) {
                    return Err(format!(
                        "unknown fuzz target `{value}` (targets: {})",
                        TARGETS.join(", ")
                    ));
                }
                only = Some(value.clone());
            }
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    ensure_cargo_fuzz()?;
    let fuzz_dir = workspace_root().join("fuzz");
    let mut summary = Vec::new();
    for target in TARGETS {
        if only.as_deref().is_some_and(|name| name != target) {
            continue;
        }
        let started = Instant::now();
        let stats = run_target(&fuzz_dir, target, seconds)?;
        summary.push((target, stats, started.elapsed()));
    }
    eprintln!("\nxtask fuzz summary ({seconds} s per target):");
    for (target, stats, elapsed) in &summary {
        let show = |value: Option<u64>| value.map_or("?".to_string(), |v| v.to_string());
        println!(
            "  {target:<12} {} executions ({} /s), corpus {} units, peak RSS {} MB, 0 crashes ({:.0} s with build)",
            show(stats.executions),
            show(stats.per_second),
            show(stats.corpus_units),
            show(stats.peak_rss_mb),
            elapsed.as_secs_f64(),
        );
    }
    Ok(())
}

/// Installs cargo-fuzz unless `cargo fuzz --version` already works.
fn ensure_cargo_fuzz() -> Result<(), String> {
    let installed = Command::new(cargo())
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if installed {
        return Ok(());
    }
    eprintln!("xtask fuzz: cargo-fuzz is missing, running: cargo install cargo-fuzz");
    let status = Command::new(cargo())
        .args(["install", "cargo-fuzz"])
        .status()
        .map_err(|e| format!("cannot run cargo install cargo-fuzz: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo install cargo-fuzz failed: {status}"))
    }
}

/// Runs one target for `seconds`, echoing libFuzzer's output, and returns its statistics.
fn run_target(fuzz_dir: &Path, target: &str, seconds: u64) -> Result<Stats, String> {
    let corpus = fuzz_dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)
        .map_err(|e| format!("cannot create {}: {e}", corpus.display()))?;
    let seeds = fuzz_dir.join("seeds").join(target);
    std::fs::create_dir_all(&seeds)
        .map_err(|e| format!("cannot create {}: {e}", seeds.display()))?;
    eprintln!("==> xtask fuzz: {target} for {seconds} s");
    let mut command = Command::new(cargo());
    command
        .current_dir(fuzz_dir)
        // cargo-fuzz passes nightly-only flags; this lets the stable compiler accept them.
        .env("RUSTC_BOOTSTRAP", "1")
        // The fuzz project keeps its own target directory (fuzz/target).
        .env_remove("CARGO_TARGET_DIR")
        // Our crates keep unsafe code to their private `sys` modules (system calls on fds the
        // targets create themselves), so AddressSanitizer would mostly re-check std and
        // serde_json while slowing each run several times over: more executions find more.
        .args(["fuzz", "run", "--sanitizer", "none", target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args([
            "-rss_limit_mb=512",
            "-timeout=5",
            "-max_len=16384",
            "-print_final_stats=1",
        ])
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run cargo fuzz run {target}: {e}"))?;
    let mut stats = Stats::default();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let line = line.map_err(|e| format!("reading cargo fuzz output: {e}"))?;
            eprintln!("{line}");
            read_stat(&line, &mut stats);
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for cargo fuzz run {target}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "fuzz target {target} failed ({status}); the crashing input is in fuzz/artifacts/{target}/"
        ));
    }
    Ok(stats)
}

/// Picks the figures out of libFuzzer's `-print_final_stats` lines and its `DONE` line.
fn read_stat(line: &str, stats: &mut Stats) {
    let number = |text: &str| text.trim().parse::<u64>().ok();
    if let Some(value) = line.strip_prefix("stat::number_of_executed_units:") {
        stats.executions = number(value);
    } else if let Some(value) = line.strip_prefix("stat::average_exec_per_sec:") {
        stats.per_second = number(value);
    } else if let Some(value) = line.strip_prefix("stat::peak_rss_mb:") {
        stats.peak_rss_mb = number(value);
    } else if line.starts_with('#') && line.contains("DONE") {
        // `#123456 DONE   cov: 1234 ft: 5678 corp: 90/12Kb ...`
        if let Some(corp) = line.split("corp: ").nth(1) {
            stats.corpus_units = corp.split('/').next().and_then(number);
        }
    }
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_statistics() {
        let mut stats = Stats::default();
        for line in [
            "#1048576 DONE   cov: 1021 ft: 4242 corp: 512/98Kb lim: 4096 exec/s: 17476 rss: 87Mb",
            "stat::number_of_executed_units: 1048576",
            "stat::average_exec_per_sec:     17476",
            "stat::peak_rss_mb:              87",
            "unrelated line",
        ] {
            read_stat(line, &mut stats);
        }
        assert_eq!(stats.executions, Some(1_048_576));
        assert_eq!(stats.per_second, Some(17_476));
        assert_eq!(stats.peak_rss_mb, Some(87));
        assert_eq!(stats.corpus_units, Some(512));
    }
}
