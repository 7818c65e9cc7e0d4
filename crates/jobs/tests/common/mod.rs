//! Helpers shared by the jobs tests: run a QEMU tool (a missing tool fails the
//! test), and run tests that spawn tools one at a time.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// The tests of a file that spawn tools run one at a time: a process spawned by one
/// test inherits, between fork and exec, the open files of another, and with them
/// their QEMU locks (open-file-description locks), which would make lock checks
/// flaky.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Run `prog` in `dir`, require success and return its stdout.
pub fn qemu(dir: &Path, prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
