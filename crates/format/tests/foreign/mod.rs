//! Shared helpers of the foreign-format driver tests: run the real qemu-img and
//! qemu-io on images a driver reads or writes, and compare guest contents.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use strata_format::BlockDevice;
use strata_storage::{FileStorage, OpenOptions, Storage};

/// A scratch directory removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("scratch dir")
}

/// Run `tool args...` (qemu-img, qemu-io); panics with its output unless it
/// exits 0; returns stdout.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img args...`, which must succeed.
pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Run qemu-io's commands (`write -P 0xab 0 64k`, ...) on the image of
/// `format` at `path`.
pub fn qemu_io(format: &str, path: &Path, cmds: &[&str]) {
    let p = path.to_str().expect("utf-8 path");
    let mut args = vec!["-f", format];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {args:?}: {out}"
    );
}

/// Open the file at `path` as a store, for writing when `write`.
pub fn storage(path: &Path, write: bool) -> Arc<dyn Storage> {
    let opts = if write {
        OpenOptions::write()
    } else {
        OpenOptions::read()
    };
    Arc::new(FileStorage::open(path, opts).expect("open file"))
}

/// A new empty file at `path`, as a store.
pub fn new_storage(path: &Path) -> Arc<dyn Storage> {
    Arc::new(FileStorage::create(path).expect("create file"))
}

/// The guest contents of `dev`, read in 1 MiB requests.
pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let size = usize::try_from(dev.virtual_size()).expect("size fits");
    let mut out = vec![0u8; size];
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        dev.read(chunk, (i as u64) << 20).expect("read");
    }
    out
}

/// The guest contents of the image of `format` at `path` as qemu-img reads
/// them (converted to raw).
pub fn qemu_contents(format: &str, path: &Path) -> Vec<u8> {
    let dir = scratch();
    let raw: PathBuf = dir.path().join("contents.raw");
    qemu_img(&[
        "convert",
        "-f",
        format,
        "-O",
        "raw",
        path.to_str().expect("utf-8 path"),
        raw.to_str().expect("utf-8 path"),
    ]);
    std::fs::read(raw).expect("read converted")
}

/// Deterministic non-repeating bytes (a seeded xorshift), for test patterns.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Assert two guest contents are equal, naming the first differing offset.
pub fn assert_same_contents(strata: &[u8], qemu: &[u8], what: &str) {
    assert_eq!(strata.len(), qemu.len(), "{what}: sizes differ");
    if let Some(i) = strata.iter().zip(qemu).position(|(a, b)| a != b) {
        panic!("{what}: contents differ first at byte {i}");
    }
}
