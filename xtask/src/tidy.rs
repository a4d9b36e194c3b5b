//! `cargo xtask tidy`: the rules of ARCHITECTURE.md that a program can check, as a test.
//!
//! - Dependency arrows between the workspace crates, read from `cargo metadata` (normal, build
//!   and dev dependencies alike; a crate may depend on itself, for test features).
//! - `unsafe` code only in a private `sys` module (`src/sys.rs` or `src/**/sys/`) of a library
//!   or the CLI; xtask, tests and benches are tools and may use it where they need it.
//! - nix (system calls) likewise only in `sys` modules, outside unit tests (`#[cfg(test)]`
//!   and below); re-exporting one of its types (`pub use nix::...`, the typed `Signal`) is
//!   allowed.
//! - No `println!`/`print!`/`eprintln!`/`eprint!` in a library's `src/` (libraries log).
//! - Every `.rs` file opens with a `//!` line saying why it exists.
//! - Sources are written for a reader without our notes: no "the seed" and no weak-point
//!   numbers such as `W24` (say "QEMU's Python `qemu.machine`" and what the point is).
//! - Each published crate has what a registry page shows: a description, keywords,
//!   categories and its own README, and no placeholder `repository`.
//!
//! Each rule is a pure function over text, so the unit tests below feed it bad input and see
//! it fire.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The allowed arrows: crate -> the workspace crates it may use. xtask may use anything.
const ARROWS: &[(&str, &[&str])] = &[
    ("qmp-proto", &[]),
    ("qmp-client", &["qmp-proto"]),
    ("console-socket", &[]),
    (
        "machine-core",
        &["qmp-client", "qmp-proto", "console-socket"],
    ),
    ("machine-cli", &["machine-core"]),
];

/// Crates with a library whose `src/` must not print.
const LIBRARIES: &[&str] = &["qmp-proto", "qmp-client", "console-socket", "machine-core"];

/// Crates whose `src/` may hold `unsafe` only in `sys` modules.
const UNSAFE_CHECKED: &[&str] = &[
    "qmp-proto",
    "qmp-client",
    "console-socket",
    "machine-core",
    "machine-cli",
];

/// Runs every rule over the workspace; Err lists each violation on its own line.
pub fn run(args: &[String]) -> Result<(), String> {
    if let Some(extra) = args.first() {
        return Err(format!("unexpected argument `{extra}`"));
    }
    let root = crate::workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(&root)
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let metadata: Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cargo metadata printed no JSON: {e}"))?;
    let mut problems = check_arrows(&metadata);
    problems.extend(check_package_metadata(&metadata, &root));
    let mut files = Vec::new();
    for krate in UNSAFE_CHECKED.iter().chain(["xtask"].iter()) {
        rust_files(&root.join(krate), &mut files)
            .map_err(|e| format!("cannot list {krate}: {e}"))?;
    }
    for path in &files {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let rel = path.strip_prefix(&root).unwrap_or(path);
        problems.extend(check_file(rel, &text));
    }
    if problems.is_empty() {
        eprintln!(
            "tidy: {} files and the dependency arrows are fine",
            files.len()
        );
        Ok(())
    } else {
        Err(format!(
            "{} rule(s) broken:\n  {}",
            problems.len(),
            problems.join("\n  ")
        ))
    }
}

/// Every `.rs` file under `dir` (skipping `target` and fuzz build output).
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        if entry.file_type()?.is_dir() {
            if name != "target" && name != "corpus" && name != "artifacts" {
                rust_files(&path, out)?;
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// Registry metadata missing from a published crate (xtask is not published).
fn check_package_metadata(metadata: &Value, root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    for package in &packages {
        let name = package["name"].as_str().unwrap_or("?");
        if name == "xtask" || !ARROWS.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let empty = |key: &str| match &package[key] {
            Value::String(text) => text.trim().is_empty(),
            Value::Array(items) => items.is_empty(),
            _ => true,
        };
        for key in ["description", "keywords", "categories", "readme"] {
            if empty(key) {
                problems.push(format!("{name}: no `{key}` in its Cargo.toml"));
            }
        }
        if let (Some(readme), Some(manifest)) = (
            package["readme"].as_str(),
            package["manifest_path"].as_str(),
        ) {
            let dir = Path::new(manifest).parent().unwrap_or(root);
            if !dir.join(readme).is_file() {
                problems.push(format!("{name}: its readme `{readme}` does not exist"));
            }
        }
        if !package["repository"].is_null() {
            problems.push(format!(
                "{name}: a `repository` is set; leave it out until there is a real one"
            ));
        }
    }
    problems
}

/// Arrows in `cargo metadata` output that ARCHITECTURE.md does not allow.
fn check_arrows(metadata: &Value) -> Vec<String> {
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    let members: Vec<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let mut problems = Vec::new();
    for package in &packages {
        let Some(name) = package["name"].as_str() else {
            continue;
        };
        if name == "xtask" {
            continue;
        }
        let Some((_, allowed)) = ARROWS.iter().find(|(n, _)| *n == name) else {
            problems.push(format!(
                "{name}: a crate ARCHITECTURE.md does not know (add its arrows to tidy)"
            ));
            continue;
        };
        let deps = package["dependencies"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for dep in &deps {
            let Some(dep_name) = dep["name"].as_str() else {
                continue;
            };
            if dep_name == name || !members.contains(&dep_name) || allowed.contains(&dep_name) {
                continue;
            }
            let kind = dep["kind"].as_str().unwrap_or("normal");
            problems.push(format!(
                "{name} -> {dep_name} ({kind} dependency): not an allowed arrow"
            ));
        }
    }
    problems
}

/// The per-file rules for the file at `rel` (relative to the workspace root).
fn check_file(rel: &Path, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let shown = rel.display();
    if !text.starts_with("//!") {
        problems.push(format!("{shown}: does not open with a `//!` line"));
    }
    let mut parts = rel.iter().filter_map(|p| p.to_str());
    let krate = parts.next().unwrap_or_default();
    let in_src = parts.next() == Some("src");
    let in_sys = rel.iter().any(|p| p == "sys" || p == "sys.rs");
    // This file names the words it looks for.
    if in_src && rel != Path::new("xtask/src/tidy.rs") {
        for (number, line) in text.lines().enumerate() {
            if let Some(word) = internal_reference(line) {
                problems.push(format!(
                    "{shown}:{}: `{word}` is a name from our notes; write for a reader without \
                     them (\"QEMU's Python `qemu.machine`\")",
                    number + 1
                ));
            }
        }
    }
    let mut in_tests = false;
    for (number, line) in code_lines(text) {
        in_tests |= line.trim() == "#[cfg(test)]";
        if in_src && UNSAFE_CHECKED.contains(&krate) && !in_sys && has_unsafe(&line) {
            problems.push(format!("{shown}:{number}: `unsafe` outside a `sys` module"));
        }
        if in_src && UNSAFE_CHECKED.contains(&krate) && !in_sys && !in_tests && calls_nix(&line) {
            problems.push(format!(
                "{shown}:{number}: nix outside a `sys` module (wrap the call in the crate's `sys`)"
            ));
        }
        if in_src && LIBRARIES.contains(&krate) && prints(&line) {
            problems.push(format!("{shown}:{number}: prints in a library (use `log`)"));
        }
    }
    problems
}

/// "the seed" or a weak-point number (`W` and one or two digits, standing alone) in `line`.
fn internal_reference(line: &str) -> Option<String> {
    if line.contains("the seed") {
        return Some("the seed".to_string());
    }
    let bytes = line.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b != b'W' || (i > 0 && bytes[i - 1].is_ascii_alphanumeric()) {
            continue;
        }
        let digits = bytes[i + 1..]
            .iter()
            .take_while(|d| d.is_ascii_digit())
            .count();
        let after = bytes.get(i + 1 + digits);
        if (1..=2).contains(&digits) && !after.is_some_and(|a| a.is_ascii_alphanumeric()) {
            return Some(line[i..i + 1 + digits].to_string());
        }
    }
    None
}

/// Lines (1-based) with comments and string contents removed well enough for token search:
/// `//` comments are cut, and the text between double quotes is blanked.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, String)> + '_ {
    text.lines().enumerate().map(|(i, line)| {
        let mut out = String::with_capacity(line.len());
        let mut in_string = false;
        let mut escaped = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if in_string {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                    out.push('"');
                }
                continue;
            }
            if c == '/' && chars.peek() == Some(&'/') {
                break;
            }
            if c == '"' {
                in_string = true;
            }
            out.push(c);
        }
        (i + 1, out)
    })
}

/// Whether `line` uses the nix crate (a path through `nix::`), other than re-exporting it.
fn calls_nix(line: &str) -> bool {
    if line.trim_start().starts_with("pub use nix::") {
        return false;
    }
    let bytes = line.as_bytes();
    line.match_indices("nix::")
        .any(|(at, _)| at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_'))
}

/// Whether `line` holds the `unsafe` keyword (a block, fn, impl, trait or extern).
fn has_unsafe(line: &str) -> bool {
    let bytes = line.as_bytes();
    let word = b"unsafe";
    let mut start = 0;
    while let Some(pos) = line[start..].find("unsafe") {
        let at = start + pos;
        let before = at.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(at + word.len()).copied();
        let ident = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ident(before) && !ident(after) {
            return true;
        }
        start = at + word.len();
    }
    false
}

/// Whether `line` calls one of the printing macros.
fn prints(line: &str) -> bool {
    ["println!", "print!", "eprintln!", "eprint!"]
        .iter()
        .any(|m| {
            line.match_indices(m).any(|(at, _)| {
                let before = line[..at].chars().next_back();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn metadata(name: &str, deps: &[(&str, &str)]) -> Value {
        let packages: Vec<Value> = crate::ci::CRATES
            .iter()
            .map(|m| {
                let dependencies: Vec<Value> = if *m == name {
                    deps.iter()
                        .map(|(d, kind)| {
                            let kind = if *kind == "normal" {
                                Value::Null
                            } else {
                                Value::from(*kind)
                            };
                            json!({"name": d, "kind": kind})
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                json!({"name": m, "dependencies": dependencies})
            })
            .collect();
        json!({ "packages": packages })
    }

    #[test]
    fn a_forbidden_arrow_is_reported_and_allowed_ones_are_not() {
        let good = metadata(
            "machine-core",
            &[
                ("qmp-client", "normal"),
                ("console-socket", "normal"),
                ("serde_json", "normal"),
                ("machine-core", "dev"),
            ],
        );
        assert!(check_arrows(&good).is_empty());
        let bad = metadata("qmp-client", &[("console-socket", "normal")]);
        assert_eq!(
            check_arrows(&bad),
            vec!["qmp-client -> console-socket (normal dependency): not an allowed arrow"]
        );
        let cli_skips = metadata("machine-cli", &[("qmp-client", "dev")]);
        assert_eq!(check_arrows(&cli_skips).len(), 1);
        let xtask = metadata("xtask", &[("machine-cli", "normal")]);
        assert!(check_arrows(&xtask).is_empty(), "xtask may use anything");
    }

    #[test]
    fn unsafe_outside_sys_is_reported() {
        let code = "//! x\nfn f() { let _ = unsafe { g() }; }\n";
        let found = check_file(Path::new("machine-core/src/machine.rs"), code);
        assert_eq!(
            found,
            vec!["machine-core/src/machine.rs:2: `unsafe` outside a `sys` module"]
        );
        assert!(check_file(Path::new("machine-core/src/sys.rs"), code).is_empty());
        assert!(check_file(Path::new("qmp-client/src/sys/fd.rs"), code).is_empty());
        // Tests and xtask may use it; words, comments and strings do not count.
        assert!(check_file(Path::new("machine-core/tests/it/a.rs"), code).is_empty());
        assert!(check_file(Path::new("xtask/src/e2e/mod.rs"), code).is_empty());
        let harmless = "//! x\n#![forbid(unsafe_code)]\n// unsafe { }\nlet s = \"unsafe {\";\n";
        assert!(check_file(Path::new("qmp-proto/src/lib.rs"), harmless).is_empty());
    }

    #[test]
    fn nix_outside_sys_is_reported_but_not_in_tests_or_re_exports() {
        let code = "//! x\nuse nix::poll::poll;\npub use nix::sys::signal::Signal;\nfn f() { unix::x(); }\n#[cfg(test)]\nmod tests { fn t() { nix::unistd::pipe(); } }\n";
        assert_eq!(
            check_file(Path::new("machine-core/src/process.rs"), code),
            vec![
                "machine-core/src/process.rs:2: nix outside a `sys` module (wrap the call in the crate's `sys`)"
            ]
        );
        assert!(check_file(Path::new("machine-core/src/sys.rs"), code).is_empty());
        assert!(check_file(Path::new("machine-cli/src/sys/tty.rs"), code).is_empty());
        assert!(check_file(Path::new("xtask/src/e2e/cli.rs"), code).is_empty());
    }

    #[test]
    fn names_from_our_notes_are_reported() {
        let code = "//! x\n/// Like the seed's `cmd()` (fixes W24).\nfn f() {}\n";
        let found = check_file(Path::new("machine-core/src/machine.rs"), code);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("machine-core/src/machine.rs:2: `the seed`"));
        assert_eq!(internal_reference("see W24."), Some("W24".to_string()));
        assert_eq!(internal_reference("(W1-W5)"), Some("W1".to_string()));
        assert_eq!(internal_reference("QEMU's Python `qemu.machine`"), None);
        assert_eq!(internal_reference("SHUTDOWN W123 WX1 aW1 W1a"), None);
        // Tests may keep their own words; only sources count.
        assert!(check_file(Path::new("machine-core/tests/it/a.rs"), code).is_empty());
    }

    #[test]
    fn registry_metadata_is_required() {
        let root = crate::workspace_root();
        let manifest = root.join("qmp-proto/Cargo.toml");
        let good = json!({"packages": [{
            "name": "qmp-proto", "description": "d", "keywords": ["qmp"],
            "categories": ["encoding"], "readme": "README.md", "repository": null,
            "manifest_path": manifest,
        }]});
        assert!(check_package_metadata(&good, &root).is_empty());
        let bad = json!({"packages": [{
            "name": "qmp-proto", "description": "", "keywords": [], "readme": "NOPE.md",
            "repository": "https://example.invalid/x", "manifest_path": manifest,
        }]});
        let found = check_package_metadata(&bad, &root);
        assert_eq!(found.len(), 5, "{found:?}");
        let xtask = json!({"packages": [{"name": "xtask"}]});
        assert!(check_package_metadata(&xtask, &root).is_empty());
    }

    #[test]
    fn printing_in_a_library_is_reported() {
        let code = "//! x\nfn f() {\n    println!(\"hi\");\n    eprint!(\"x\");\n}\n";
        let found = check_file(Path::new("qmp-client/src/session.rs"), code);
        assert_eq!(
            found,
            vec![
                "qmp-client/src/session.rs:3: prints in a library (use `log`)",
                "qmp-client/src/session.rs:4: prints in a library (use `log`)",
            ]
        );
        // The CLI and xtask print; doc examples are comments.
        assert!(check_file(Path::new("machine-cli/src/output.rs"), code).is_empty());
        assert!(check_file(Path::new("xtask/src/ci.rs"), code).is_empty());
        let doc = "//! x\n//! println!(\"{report}\");\n/// print!(\"a\")\n";
        assert!(check_file(Path::new("machine-core/src/lib.rs"), doc).is_empty());
    }

    #[test]
    fn a_file_without_its_opening_doc_line_is_reported() {
        let found = check_file(Path::new("console-socket/src/ring.rs"), "use std::io;\n");
        assert_eq!(
            found,
            vec!["console-socket/src/ring.rs: does not open with a `//!` line"]
        );
        let found = check_file(Path::new("xtask/src/x.rs"), "// plain comment\n");
        assert_eq!(found.len(), 1);
    }
}
