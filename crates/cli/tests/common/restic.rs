//! Helpers of the backup tests: `strata backup` and the real `restic` on one
//! repository (a missing restic fails the test), disks with mixed content, and
//! the guest view of an image as QEMU reads it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::STRATA;

pub const PASSWORD: &str = "interop secret";
pub const MIB: usize = 1 << 20;

/// Run `cmd`; it must succeed.
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

/// `strata backup ARGS` with the password in the environment.
pub fn strata(args: &[&str]) -> Command {
    let mut c = Command::new(STRATA);
    c.arg("backup").args(args);
    for v in [
        "RESTIC_PASSWORD_FILE",
        "RESTIC_REPOSITORY",
        "STRATA_REPOSITORY",
    ] {
        c.env_remove(v);
    }
    c.env("STRATA_PASSWORD", PASSWORD)
        .env_remove("RESTIC_PASSWORD");
    c
}

/// `restic -r REPO ARGS`, without a cache.
pub fn restic(repo: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
    let mut c = Command::new("restic");
    c.arg("--no-cache").arg("-r").arg(repo).args(args);
    c.env("RESTIC_PASSWORD", PASSWORD)
        .env_remove("RESTIC_PASSWORD_FILE");
    c
}

pub fn qemu_img(args: &[&str]) -> Output {
    run(Command::new("qemu-img").args(args))
}

/// Incompressible bytes.
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

/// A 40 MiB raw disk: noise, a long zero run, compressible text, noise, and an
/// odd-sized tail.
pub fn raw_disk(path: &Path) -> Vec<u8> {
    let mut d = noise(6 * MIB);
    d.resize(20 * MIB, 0);
    d.extend(b"strata backup ".iter().cycle().take(6 * MIB));
    d.extend(noise(14 * MIB - 12345));
    std::fs::write(path, &d).unwrap();
    d
}

/// A qcow2 chain: a base converted from [`raw_disk`] and an overlay with a pattern
/// write and a zeroed range over it. Returns the top's path.
pub fn qcow2_chain(dir: &Path) -> PathBuf {
    let raw = dir.join("base.raw");
    raw_disk(&raw);
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&base)]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ]);
    run(Command::new("qemu-io").args([
        "-c",
        "write -P 0x5a 3M 2M",
        "-c",
        "write -z 30M 5M",
        "-c",
        "write -P 0x11 39M 512k",
        s(&top),
    ]));
    top
}

/// The disk a guest sees in `image` (its chain read through), as
/// `qemu-img convert -O raw` writes it (a raw file's length rounds up to 512 bytes).
pub fn guest_view(image: &Path) -> Vec<u8> {
    let out = image.with_extension("guest-view");
    qemu_img(&["convert", "-O", "raw", s(image), s(&out)]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// The bytes `qemu-img map` reports as data in `image`.
pub fn allocated(image: &Path) -> u64 {
    let out = qemu_img(&["map", "--output=json", s(image)]);
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    map.iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
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

pub fn snapshots_json(o: &Output) -> Vec<serde_json::Value> {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// `restic check --read-data` passes on `repo`.
pub fn restic_check(repo: &Path) {
    reads_clean(restic(repo, &["check", "--read-data"]));
}

/// `cmd` (a `restic check` or a `strata backup verify`) succeeds and finds no error.
pub fn reads_clean(cmd: Command) {
    let out = run(cmd);
    assert!(
        stdout(&out).contains("no errors were found"),
        "{}",
        stdout(&out)
    );
}

/// `strata backup verify` (every pack read) passes on `repo`.
pub fn strata_verify(repo: &Path) {
    reads_clean(strata(&["verify", "--repo", s(repo)]));
}

/// The full IDs of the snapshots strata lists, sorted.
pub fn snapshot_ids(repo: &Path) -> Vec<String> {
    let mut ids: Vec<String> =
        snapshots_json(&run(strata(&["list", "--repo", s(repo), "--output=json"])))
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect();
    ids.sort();
    ids
}

/// The full IDs of the snapshots restic lists, sorted.
pub fn restic_snapshot_ids(repo: &Path) -> Vec<String> {
    let mut ids: Vec<String> = snapshots_json(&run(restic(repo, &["snapshots", "--json"])))
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// Every snapshot of `repo` is one of `expected` (full ID to disk bytes) and
/// restores, through strata, to exactly its bytes.
pub fn all_restore(repo: &Path, expected: &std::collections::HashMap<String, Vec<u8>>) {
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("restore-check.raw");
    for id in snapshot_ids(repo) {
        let want = expected
            .get(&id)
            .unwrap_or_else(|| panic!("snapshot {id} was never made by a finished backup"));
        run(strata(&["restore", "--repo", s(repo), &id[..12], s(&out)]));
        assert!(
            std::fs::read(&out).unwrap() == *want,
            "snapshot {id} restores other bytes"
        );
    }
}

/// The full ID of the snapshot whose short ID strata printed.
pub fn full_id(repo: &Path, short: &str) -> String {
    snapshot_ids(repo)
        .into_iter()
        .find(|id| id.starts_with(short))
        .unwrap_or_else(|| panic!("no snapshot {short}"))
}

/// A loop bound from the environment variable `var`, `default` when unset.
pub fn env_count(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `strata backup serve REPO SNAPSHOT` on the Unix socket `sock` as export
/// `export`, once the socket is there (the caller stops the child).
pub fn serve(repo: &Path, snapshot: &str, sock: &Path, export: &str) -> std::process::Child {
    let server = strata(&[
        "serve",
        "--repo",
        s(repo),
        snapshot,
        "-k",
        s(sock),
        "-x",
        export,
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    server
}

/// strata restores `snapshot` of `repo` to a raw file equal to `reference`
/// and to a qcow2 image `qemu-img check` passes and `qemu-img compare` finds
/// equal to it (both written beside `reference`).
pub fn restores_raw_and_qcow2(repo: &Path, snapshot: &str, reference: &Path) {
    let out = reference.with_extension("restored.raw");
    run(strata(&["restore", "--repo", s(repo), snapshot, s(&out)]));
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(reference).unwrap(),
        "strata's raw restore of {snapshot} differs"
    );
    let out_q = reference.with_extension("restored.qcow2");
    run(strata(&[
        "restore",
        "--repo",
        s(repo),
        snapshot,
        s(&out_q),
        "-O",
        "qcow2",
    ]));
    qemu_img(&["check", s(&out_q)]);
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        s(&out_q),
        s(reference),
    ]);
}
