//! Everything else: completions, usage errors, and QEMU missing for `run` and `wrap`.

use crate::util::run;

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let r = run(&["completions", shell], "", &[]);
        r.expect_code(0);
        assert!(r.stdout.contains("qemu-machine"), "{shell}");
        assert!(r.stdout.contains("shell"), "{shell}");
    }
}

#[test]
fn usage_errors_are_status_2() {
    for args in [
        vec![],
        vec!["frobnicate"],
        vec!["qmp"],
        vec!["events"],
        vec!["run", "--accel", "warp"],
        vec!["run", "--timeout", "soon"],
        vec!["wrap"],
    ] {
        let r = run(&args, "", &[]);
        r.expect_code(2);
    }
}

#[test]
fn qemu_missing_is_status_4() {
    let r = run(
        &[
            "run",
            "--qemu",
            "/nonexistent/qemu-system-x86_64",
            "--exit-after-banner",
        ],
        "",
        &[],
    );
    r.expect_code(4);
    assert!(
        r.stderr.contains("/nonexistent/qemu-system-x86_64"),
        "{}",
        r.stderr
    );
    assert_eq!(
        r.stderr
            .lines()
            .filter(|l| l.starts_with("qemu-machine:"))
            .count(),
        1
    );

    let r = run(
        &[
            "wrap",
            "--qemu",
            "/nonexistent/qemu-system-x86_64",
            "--",
            "-M",
            "none",
        ],
        "",
        &[],
    );
    r.expect_code(4);
    assert!(
        r.stderr.contains("/nonexistent/qemu-system-x86_64"),
        "{}",
        r.stderr
    );
}
