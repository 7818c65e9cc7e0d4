//! Helpers for the backup tests: `strata backup` and the real `restic` (a missing
//! binary fails the test) with one password, and readers of their output.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::{Command, Output};

/// The password every test repository is made with.
pub const PASSWORD: &str = "interop secret";

/// Run `cmd`, require success and return its output.
pub fn run(mut cmd: impl std::borrow::BorrowMut<Command>) -> Output {
    let cmd = cmd.borrow_mut();
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?} did not start ({e}); scripts/install-deps.sh installs it")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `strata backup ARGS` with the password in the environment and no repository
/// inherited from it.
pub fn strata(args: &[&str]) -> Command {
    let mut c = Command::new(super::STRATA);
    c.arg("backup").args(args);
    for v in [
        "RESTIC_PASSWORD_FILE",
        "RESTIC_REPOSITORY",
        "STRATA_REPOSITORY",
        "RESTIC_PASSWORD",
    ] {
        c.env_remove(v);
    }
    c.env("STRATA_PASSWORD", PASSWORD);
    c
}

/// `restic -r REPO ARGS`, without a cache.
pub fn restic(repo: impl AsRef<OsStr>, args: &[&str]) -> Command {
    let mut c = Command::new("restic");
    c.arg("--no-cache").arg("-r").arg(repo).args(args);
    c.env("RESTIC_PASSWORD", PASSWORD)
        .env_remove("RESTIC_PASSWORD_FILE");
    c
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The 8-digit ID from strata's `snapshot XXXXXXXX saved`.
pub fn saved_id(o: &Output) -> String {
    let text = stdout(o);
    let line = text
        .lines()
        .find(|l| l.starts_with("snapshot ") && l.ends_with(" saved"))
        .unwrap_or_else(|| panic!("no 'snapshot ... saved' line in {text}"));
    line.split(' ').nth(1).unwrap().to_string()
}

/// A `--json` / `--output=json` snapshot listing.
pub fn snapshots_json(o: &Output) -> Vec<serde_json::Value> {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// `restic check --read-data` finds no error.
pub fn restic_check_reads_clean(mut cmd: Command) {
    let out = run(&mut cmd);
    assert!(
        stdout(&out).contains("no errors were found"),
        "{}",
        stdout(&out)
    );
}

/// `len` incompressible bytes.
pub fn noise(len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut v = Vec::with_capacity(len);
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .take(len as u64)
        .read_to_end(&mut v)
        .unwrap();
    v
}
