//! Shared by the repair tests: running qemu-img, reading its verdicts, and
//! checking or repairing image bytes with strata in process.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use strata_format::qcow2::{CheckReport, Qcow2Image, Qcow2OpenOptions, Repair};
use strata_storage::{MemStorage, Storage};

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Run qemu-img; its exit code and stdout followed by stderr.
pub fn qemu_img(args: &[&str]) -> (i32, String) {
    run("qemu-img", args)
}

/// Run qemu-io; its exit code and output.
pub fn qemu_io(args: &[&str]) -> (i32, String) {
    run("qemu-io", args)
}

fn run(tool: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} must be installed: {e}"));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// What `qemu-img check` said about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The exit code: 0 clean, 1 check failed, 2 corruptions, 3 leaks only.
    pub code: i32,
    pub corruptions: u64,
    pub leaks: u64,
}

/// `qemu-img check` of the image at `path`.
pub fn qemu_check(path: &Path) -> (Verdict, String) {
    let (code, out) = qemu_img(&["check", "--output=json", path.to_str().unwrap()]);
    let field = |name: &str| -> u64 {
        let key = format!("\"{name}\": ");
        out.find(&key)
            .map(|at| {
                out[at + key.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (
        Verdict {
            code,
            corruptions: field("corruptions"),
            leaks: field("leaks"),
        },
        out,
    )
}

/// The number qemu-img's repair summary gives for `what` ("leaked clusters",
/// "corruptions").
pub fn repaired_count(out: &str, what: &str) -> u64 {
    out.lines()
        .find(|l| l.trim_end().ends_with(what) && l.starts_with("    "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The exit code `strata img check` gives for a report (qemu-img's classes).
pub fn exit_class(r: &CheckReport) -> i32 {
    if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

/// strata's check of `bytes` (opened read-only, as `strata img check` opens it):
/// the exit code and the report; an image that does not open is code 1.
pub fn strata_check(bytes: &[u8]) -> (i32, Result<CheckReport, String>) {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    let img = Qcow2Image::open(
        s,
        Qcow2OpenOptions {
            read_only: true,
            no_auto_repair: true,
            for_check: true,
            ..Default::default()
        },
    );
    match img.and_then(|img| img.check(Repair::None)) {
        Ok(r) => (exit_class(&r), Ok(r)),
        Err(e) => (1, Err(e.to_string())),
    }
}

/// strata's `check -r` of `bytes`: the image afterwards and the report, or the
/// error that stopped it (the bytes as far as the repair got).
pub fn strata_repair(bytes: &[u8], repair: Repair) -> (Vec<u8>, Result<CheckReport, String>) {
    let mem = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    let s: Arc<dyn Storage> = mem.clone();
    let r = Qcow2Image::open(
        s,
        Qcow2OpenOptions {
            for_repair: true,
            no_auto_repair: true,
            for_check: true,
            ..Default::default()
        },
    )
    .and_then(|img| {
        let r = img.check(repair)?;
        img.close()?;
        Ok(r)
    });
    (mem.snapshot(), r.map_err(|e| e.to_string()))
}
