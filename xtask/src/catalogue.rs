//! `cargo xtask catalogue`: keeps `RELIABILITY.md` true. Every case of the fault catalogue
//! must have one row, and every test, scenario, figure or fuzz target a row names must exist
//! in the source as it is now. `cargo xtask ci` runs it first, so a renamed or deleted test
//! fails CI instead of leaving the table citing nothing.
//!
//! A row of the table is `| N | case | promise | proved by | last result |`. The "proved by"
//! cell is either `n/a: reason`, or citations in backticks:
//!
//! - `` `CRATE::NAME` ``: a `#[test]` function NAME anywhere in the crate's folder (unit tests,
//!   `tests/`, `benches/`); the file and module are left out so moving a test keeps the
//!   citation;
//! - `` `e2e:NAME` ``: a scenario of `cargo xtask e2e`;
//! - `` `reliability:NAME` ``: a figure of `cargo xtask reliability`;
//! - `` `fuzz:NAME` ``: a target of `cargo xtask fuzz` (with its source in `fuzz/fuzz_targets/`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::ci::CRATES;
use crate::workspace_root;

/// How many cases the fault catalogue has (section 2 of `fault-catalogue.md`, numbered 1-40).
pub const CASES: u32 = 40;

/// Checks `RELIABILITY.md` against the workspace; prints what it checked.
pub fn run(args: &[String]) -> Result<(), String> {
    if let Some(extra) = args.first() {
        return Err(format!("unexpected argument `{extra}`"));
    }
    let root = workspace_root();
    let table = std::fs::read_to_string(root.join("RELIABILITY.md"))
        .map_err(|e| format!("cannot read RELIABILITY.md: {e}"))?;
    let known = Known::from_workspace(&root)?;
    let rows = parse_table(&table);
    let problems = check(&rows, &known);
    if problems.is_empty() {
        let cited: usize = rows.iter().map(|r| r.citations.len()).sum();
        let na = rows.iter().filter(|r| r.not_applicable).count();
        let cases = rows.iter().filter(|r| r.case.is_some()).count();
        eprintln!(
            "RELIABILITY.md: {cases} cases and {} other rows, {cited} citations all found, \
             {na} not applicable",
            rows.len() - cases
        );
        Ok(())
    } else {
        Err(format!(
            "RELIABILITY.md is out of date:\n  {}",
            problems.join("\n  ")
        ))
    }
}

/// What exists: the names a citation may point at.
#[derive(Debug, Default)]
pub struct Known {
    /// `#[test]` functions, per crate folder.
    tests: BTreeMap<String, BTreeSet<String>>,
    scenarios: BTreeSet<String>,
    figures: BTreeSet<String>,
    fuzz_targets: BTreeSet<String>,
}

impl Known {
    /// Reads the test names from the source of every crate, the scenarios, figures and fuzz
    /// targets from the xtask registries (a fuzz target also needs its source file).
    pub fn from_workspace(root: &Path) -> Result<Known, String> {
        let mut known = Known::default();
        // The crates whose tests a row may cite (each folder is named like its crate).
        for krate in CRATES {
            let mut names = BTreeSet::new();
            for file in rust_files(&root.join(krate))? {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                names.extend(test_names(&text));
            }
            known.tests.insert(krate.to_string(), names);
        }
        known.scenarios = crate::e2e::all_scenarios()
            .iter()
            .map(|s| s.name.to_string())
            .collect();
        known.figures = crate::reliability::FIGURES
            .iter()
            .map(|f| f.to_string())
            .collect();
        known.fuzz_targets = crate::fuzz::TARGETS
            .iter()
            .filter(|t| {
                root.join("fuzz/fuzz_targets")
                    .join(format!("{t}.rs"))
                    .is_file()
            })
            .map(|t| t.to_string())
            .collect();
        Ok(known)
    }
}

/// Every `.rs` file under `dir`, build output excluded.
fn rust_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry
                .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
                .path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "target") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    Ok(out)
}

/// The names of the `#[test]` functions in a Rust source file: a `fn` whose attributes (on
/// the lines right above it, comments allowed between them) include `#[test]`.
pub fn test_names(source: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut marked = false;
    for line in source.lines() {
        let line = line.trim();
        if line.starts_with("#[test]") {
            marked = true;
            continue;
        }
        if line.starts_with("#[") || line.starts_with("//") || line.is_empty() {
            continue;
        }
        if marked {
            if let Some(name) = fn_name(line) {
                names.insert(name.to_string());
            }
        }
        marked = false;
    }
    names
}

/// The function name declared on `line` (`fn name(`, after any qualifiers), if any.
fn fn_name(line: &str) -> Option<&str> {
    let after = line.split("fn ").nth(1)?;
    let end = after
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(after.len());
    (end > 0).then(|| &after[..end])
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The case number; `None` for a row beyond the catalogue (`F1`, `M1`: the fleet, the
    /// multiplexer), whose citations are checked the same way.
    pub case: Option<u32>,
    /// How problems name the row: `case 17` or `F1`.
    pub label: String,
    /// The "proved by" citations (backticked tokens).
    pub citations: Vec<String>,
    /// The row says `n/a: reason`.
    pub not_applicable: bool,
    /// The promise cell is filled.
    pub has_promise: bool,
    /// The last-result cell is filled.
    pub has_result: bool,
}

/// The rows of every table line whose first cell is a case number, or a label of capital
/// letters and digits (`F1`) for rows beyond the catalogue.
pub fn parse_table(text: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(inner) = line.strip_prefix('|') else {
            continue;
        };
        let cells: Vec<&str> = inner
            .trim_end_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        let first = cells.first().copied().unwrap_or("");
        let (case, label) = match first.parse::<u32>() {
            Ok(n) => (Some(n), format!("case {n}")),
            Err(_) => {
                let letters = first.trim_end_matches(|c: char| c.is_ascii_digit());
                let is_label = !letters.is_empty()
                    && letters.len() < first.len()
                    && letters.chars().all(|c| c.is_ascii_uppercase());
                if !is_label {
                    continue;
                }
                (None, first.to_string())
            }
        };
        let cell = |i: usize| cells.get(i).copied().unwrap_or("");
        let proof = cell(3);
        let not_applicable = proof.starts_with("n/a:") && proof.len() > "n/a:".len() + 3;
        rows.push(Row {
            case,
            label,
            citations: backticked(proof),
            not_applicable,
            has_promise: !cell(2).is_empty(),
            has_result: !cell(4).is_empty(),
        });
    }
    rows
}

/// The backticked tokens of a cell.
fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.trim().to_string())
        .collect()
}

/// Everything wrong with the table; empty when it is true.
pub fn check(rows: &[Row], known: &Known) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = BTreeMap::new();
    for row in rows {
        let label = &row.label;
        if let Some(case) = row.case {
            *seen.entry(case).or_insert(0) += 1;
            if case == 0 || case > CASES {
                problems.push(format!("{label} is not in the catalogue (1-{CASES})"));
            }
        }
        if !row.has_promise {
            problems.push(format!("{label}: no promise"));
        }
        if !row.has_result {
            problems.push(format!("{label}: no last result"));
        }
        if row.citations.is_empty() && !row.not_applicable {
            problems.push(format!(
                "{label}: proved by nothing (cite a test, or say `n/a: reason`)"
            ));
        }
        for citation in &row.citations {
            if let Err(why) = resolve(citation, known) {
                problems.push(format!("{label}: `{citation}`: {why}"));
            }
        }
    }
    for case in 1..=CASES {
        match seen.get(&case) {
            None => problems.push(format!("case {case} has no row")),
            Some(1) => {}
            Some(n) => problems.push(format!("case {case} has {n} rows")),
        }
    }
    problems
}

/// Whether a citation names something that exists; why not otherwise.
fn resolve(citation: &str, known: &Known) -> Result<(), String> {
    let (kind, name) = if let Some((krate, test)) = citation.split_once("::") {
        let tests = known
            .tests
            .get(krate)
            .ok_or_else(|| format!("no crate `{krate}` (crates: {})", CRATES.join(", ")))?;
        return if tests.contains(test) {
            Ok(())
        } else {
            Err(format!("no #[test] fn `{test}` in {krate}"))
        };
    } else if let Some((kind, name)) = citation.split_once(':') {
        (kind, name)
    } else {
        return Err("not a citation (CRATE::test, e2e:NAME, reliability:NAME, fuzz:NAME)".into());
    };
    let set = match kind {
        "e2e" => &known.scenarios,
        "reliability" => &known.figures,
        "fuzz" => &known.fuzz_targets,
        other => return Err(format!("unknown kind `{other}`")),
    };
    if set.contains(name) {
        Ok(())
    } else {
        Err(format!("no {kind} `{name}`"))
    }
}

// The real table against the real source is checked by `cargo xtask catalogue` (a CI step),
// not here: reading the whole source from a unit test would open fds while the e2e harness
// tests count this process's fds.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_are_read_from_attributes_above_fns() {
        let source = r#"
            fn helper() {}
            #[test]
            fn plain() {}
            /// Docs.
            #[test]
            // A comment.
            #[cfg_attr(miri, ignore)]
            fn with_attributes() {}
            #[cfg(test)]
            fn not_a_test() {}
            #[test]
            pub(crate) async fn qualified() {}
        "#;
        let names: Vec<String> = test_names(source).into_iter().collect();
        assert_eq!(names, ["plain", "qualified", "with_attributes"]);
    }

    fn known() -> Known {
        let mut known = Known::default();
        known.tests.insert(
            "qmp-client".into(),
            ["eof_fails_pending_commands".to_string()].into(),
        );
        known.scenarios.insert("machine_kill".into());
        known.figures.insert("soak".into());
        known.fuzz_targets.insert("session".into());
        known
    }

    fn table(rows: &[String]) -> String {
        let mut text = String::from(
            "| # | case | promise | proved by | last result |\n|---|---|---|---|---|\n",
        );
        for row in rows {
            text.push_str(row);
            text.push('\n');
        }
        text
    }

    fn full(case_17: &str) -> String {
        let rows: Vec<String> = (1..=CASES)
            .map(|n| {
                if n == 17 {
                    case_17.to_string()
                } else {
                    format!(
                        "| {n} | case | promise | `e2e:machine_kill`, `reliability:soak` | pass |"
                    )
                }
            })
            .collect();
        table(&rows)
    }

    #[test]
    fn a_true_table_passes() {
        let text = full("| 17 | EOF | Disconnected | `qmp-client::eof_fails_pending_commands`, `fuzz:session` | pass |");
        assert_eq!(check(&parse_table(&text), &known()), Vec::<String>::new());
        let text = full("| 17 | x | y | n/a: QEMU cannot do this here | - |");
        assert_eq!(check(&parse_table(&text), &known()), Vec::<String>::new());
    }

    #[test]
    fn a_test_that_no_longer_exists_fails() {
        let text =
            full("| 17 | EOF | Disconnected | `qmp-client::eof_fails_pending_commmands` | pass |");
        let problems = check(&parse_table(&text), &known());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("no #[test] fn `eof_fails_pending_commmands` in qmp-client"));
        for (bad, why) in [
            ("`qmp-clint::eof_fails_pending_commands`", "no crate"),
            ("`e2e:machine_kil`", "no e2e"),
            ("`reliability:soakk`", "no reliability"),
            ("`fuzz:sesion`", "no fuzz"),
            ("`eof_fails_pending_commands`", "not a citation"),
        ] {
            let text = full(&format!("| 17 | EOF | Disconnected | {bad} | pass |"));
            let problems = check(&parse_table(&text), &known());
            assert!(
                problems.iter().any(|p| p.contains(why)),
                "{bad}: {problems:?}"
            );
        }
    }

    #[test]
    fn a_missing_or_empty_case_fails() {
        let mut rows: Vec<String> = (1..=CASES)
            .filter(|n| *n != 23)
            .map(|n| format!("| {n} | case | promise | `e2e:machine_kill` | pass |"))
            .collect();
        rows.push("| 41 | extra | promise | `e2e:machine_kill` | pass |".into());
        rows.push("| 5 | again | promise | `e2e:machine_kill` | pass |".into());
        rows.push("| 7 | x | | | |".into());
        let problems = check(&parse_table(&table(&rows)), &known());
        for expected in [
            "case 23 has no row",
            "case 41 is not in the catalogue",
            "case 5 has 2 rows",
            "case 7: no promise",
            "case 7: proved by nothing",
            "case 7: no last result",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected}: {problems:?}"
            );
        }
        // Rows beyond the catalogue are checked too, and counted as no case.
        let mut text = full("| 17 | EOF | Disconnected | `e2e:machine_kill` | pass |");
        text.push_str("| F1 | fleet | promise | `qmp-client::no_such_test` | pass |\n");
        text.push_str("| M2 | mux | | `e2e:machine_kill` | pass |\n");
        text.push_str("| Note | not a row | x | `nothing` | x |\n");
        let problems = check(&parse_table(&text), &known());
        assert_eq!(
            problems,
            [
                "F1: `qmp-client::no_such_test`: no #[test] fn `no_such_test` in qmp-client",
                "M2: no promise",
            ],
            "{problems:?}"
        );
        let text = full("| 17 | x | y | n/a: | - |");
        let problems = check(&parse_table(&text), &known());
        assert!(
            problems.iter().any(|p| p.contains("proved by nothing")),
            "{problems:?}"
        );
    }
}
