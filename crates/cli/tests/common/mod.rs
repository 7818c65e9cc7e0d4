//! Parity machinery shared by the tests that hold `strata img` to qemu-img: run
//! both tools on the same files and compare stdout, stderr and the exit code.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub const STRATA: &str = env!("CARGO_BIN_EXE_strata");

/// Run `prog` with `args` (text or raw bytes) in `dir`; it must succeed.
pub fn sh<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(dir: &Path, prog: &str, args: &[S]) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Output of one run: exit code, stdout, stderr (program name normalised).
pub fn run(dir: &Path, prog: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = if prog == "strata" {
        let mut c = Command::new(STRATA);
        c.arg("img");
        c
    } else {
        Command::new("qemu-img")
    };
    let out = cmd
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
    let err = String::from_utf8_lossy(&out.stderr)
        .replace("strata img", "qemu-img")
        .replace("qemu-img:", "PROG:");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err,
    )
}

thread_local! {
    static FAILURES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `args` through both tools and record any difference (all differences of a
/// test are reported together by [`assert_all_same`]).
pub fn same(dir: &Path, args: &[&str]) {
    let ours = run(dir, "strata", args);
    let theirs = run(dir, "qemu-img", args);
    if ours != theirs {
        FAILURES.with(|f| {
            f.borrow_mut().push(format!(
                "`img {}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}",
                args.join(" ")
            ))
        });
    }
}

pub fn assert_all_same() {
    let failures = FAILURES.with(|f| std::mem::take(&mut *f.borrow_mut()));
    assert!(
        failures.is_empty(),
        "{} differences from qemu-img:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
