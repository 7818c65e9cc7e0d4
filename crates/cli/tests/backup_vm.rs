//! Backups of a running VM of `strata vm` (firmware only, no guest boots; the
//! disk changes through QEMU's own block layer): a full backup that reads all
//! but what QEMU reports as zeroes (`base:allocation`), then
//! incrementals that read only the chunks QEMU's persistent dirty bitmap marks,
//! also after the VM restarts; a bitmap removed behind strata's back makes the
//! next backup read everything and say so, and so does a QEMU killed (its
//! bitmap never stored, or stored and left inconsistent). Every backup restores to the disk as
//! QEMU shows it, and restic checks the repository.

mod common;

use common::restic::{qemu_img, restic_check, run, s, saved_id, stdout, strata, strata_verify};
use common::vm::{monitor, qemu_io_inside};
use common::STRATA;
use std::path::Path;
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;
/// 100 chunks of 4 MiB: one changed chunk is 1 % of the disk.
const DISK: u64 = 400 * MIB;
/// The one chunk never written: QEMU reports it as zeroes, no backup reads it.
const HOLE_CHUNK: u64 = 60;
/// What a full read reads: every chunk but the hole.
const ALLOCATED: u64 = DISK - 4 * MIB;

fn vm(state: &Path, args: &[&str]) -> Output {
    run(Command::new(STRATA)
        .arg("vm")
        .arg("--state-dir")
        .arg(state)
        .args(args))
}

/// `strata backup create --vm t`: (snapshot ID, bytes read, stderr).
fn backup(repo: &Path, state: &Path) -> (String, u64, String) {
    let o = run(strata(&[
        "create",
        "--repo",
        s(repo),
        "--vm",
        "t",
        "--state-dir",
        s(state),
    ]));
    let out = stdout(&o);
    let read = out
        .split(", ")
        .find_map(|p| p.strip_suffix(" bytes read"))
        .unwrap_or_else(|| panic!("no bytes read in {out}"))
        .parse()
        .unwrap();
    (
        saved_id(&o),
        read,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Snapshot `id` restores to exactly what QEMU shows of the running disk.
fn restores_to_disk(repo: &Path, id: &str, disk: &str, dir: &Path) {
    let out = dir.join(format!("{id}.raw"));
    run(strata(&["restore", "--repo", s(repo), id, s(&out)]));
    qemu_img(&["compare", "-U", "-f", "qcow2", "-F", "raw", disk, s(&out)]);
    std::fs::remove_file(out).unwrap();
}

struct Kill<'a>(&'a Path);
impl Drop for Kill<'_> {
    fn drop(&mut self) {
        let _ = Command::new(STRATA)
            .arg("vm")
            .arg("--state-dir")
            .arg(self.0)
            .args(["kill", "t"])
            .output();
    }
}

#[test]
fn incrementals_of_a_running_vm_read_only_what_its_persistent_bitmap_marks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (state, repo) = (dir.join("state"), dir.join("repo"));
    let vm_dir = state.join("vms").join("t");
    let disk = dir.join("d.qcow2");
    let d = s(&disk);
    qemu_img(&["create", "-q", "-f", "qcow2", d, &DISK.to_string()]);
    // Every chunk different: a restore that took a wrong chunk cannot pass.
    let mut fill = Command::new("qemu-io");
    for i in (0..DISK / (4 * MIB)).filter(|&i| i != HOLE_CHUNK) {
        fill.args(["-c", &format!("write -P {} {}M 4M", i % 250 + 1, i * 4)]);
    }
    run(fill.arg(d));
    run(strata(&["init", "--repo", s(&repo)]));
    vm(&state, &["define", "t", "--memory", "64M", "--disk", d]);
    vm(&state, &["start", "t"]);
    let _kill = Kill(&state);

    let (full, read, err) = backup(&repo, &state);
    assert_eq!(read, ALLOCATED, "the first backup reads all but the hole");
    assert!(err.contains("reading the whole disk"), "{err}");
    restores_to_disk(&repo, &full, d, dir);

    // 1 % changes (one chunk, written through QEMU): 1 % is read.
    qemu_io_inside(&vm_dir, "write -P 0xaa 100M 3M");
    qemu_io_inside(&vm_dir, "write -P 0xab 103M 1M");
    let (inc, read, err) = backup(&repo, &state);
    assert_eq!(read, 4 * MIB, "{err}");
    assert!(
        err.contains("incremental: 1 of 100 chunks changed"),
        "{err}"
    );
    restores_to_disk(&repo, &inc, d, dir);
    // The full backup still holds the old data of the changed chunk.
    let old = dir.join("full.raw");
    run(strata(&["restore", "--repo", s(&repo), &full, s(&old)]));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 26 100M 4M", s(&old)]));

    // strata killed while it reads the point: the next backup removes the
    // fleecing job, overlay and export left in QEMU, and the changes of the
    // killed backup's bitmap go back to the previous one: still incremental.
    qemu_io_inside(&vm_dir, "write -P 0xac 150M 4k");
    let o = strata(&[
        "create",
        "--repo",
        s(&repo),
        "--vm",
        "t",
        "--state-dir",
        s(&state),
    ])
    .env("STRATA_VM_CRASH_AT", "backup-point")
    .output()
    .unwrap();
    assert_eq!(
        o.status.code(),
        Some(86),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let jobs = || monitor(&vm_dir).execute_value("query-jobs", None).unwrap();
    assert_eq!(
        jobs().as_array().unwrap().len(),
        1,
        "the killed backup's job runs on"
    );
    qemu_io_inside(&vm_dir, "write -P 0xad 170M 4k");
    let (resumed, read, err) = backup(&repo, &state);
    assert_eq!(
        read,
        8 * MIB,
        "both changes, before and after the kill: {err}"
    );
    assert_eq!(jobs(), serde_json::json!([]));
    restores_to_disk(&repo, &resumed, d, dir);

    // The bitmap is persistent: it survives QEMU quitting and starting again.
    vm(&state, &["stop", "t", "--timeout", "1"]);
    vm(&state, &["start", "t"]);
    qemu_io_inside(&vm_dir, "write -P 0xbb 201M 64k");
    let (after_restart, read, err) = backup(&repo, &state);
    assert_eq!(read, 4 * MIB, "{err}");
    restores_to_disk(&repo, &after_restart, d, dir);

    // A bitmap removed behind strata's back: everything is read, said out loud.
    {
        let qmp = monitor(&vm_dir);
        let nodes = qmp
            .execute_value(
                "query-named-block-nodes",
                Some(serde_json::json!({"flat": true})),
            )
            .unwrap();
        let (node, bitmap) = nodes
            .as_array()
            .unwrap()
            .iter()
            .find_map(|n| {
                let b = n["dirty-bitmaps"].as_array()?.first()?;
                Some((
                    n["node-name"].as_str()?.to_string(),
                    b["name"].as_str()?.to_string(),
                ))
            })
            .expect("a dirty bitmap on the disk");
        qmp.execute_value(
            "block-dirty-bitmap-remove",
            Some(serde_json::json!({"node": node, "name": bitmap})),
        )
        .unwrap();
    }
    qemu_io_inside(&vm_dir, "write -P 0xcc 300M 4k");
    let (fallback, read, err) = backup(&repo, &state);
    assert_eq!(read, ALLOCATED, "{err}");
    assert!(
        err.contains("reading the whole disk") && err.contains("missing"),
        "{err}"
    );
    restores_to_disk(&repo, &fallback, d, dir);
    // ... and the next one is incremental again.
    qemu_io_inside(&vm_dir, "write -P 0xdd 0 4k");
    let (last, read, err) = backup(&repo, &state);
    assert_eq!(read, 4 * MIB, "{err}");
    restores_to_disk(&repo, &last, d, dir);

    // QEMU killed: it stores persistent bitmaps only when it closes the disk,
    // so a bitmap made in this run is gone, and one an earlier clean stop stored
    // is marked in use and left inconsistent. Either way everything is read.
    for (restart, reason) in [(false, "QEMU ended"), (true, "inconsistent")] {
        if restart {
            vm(&state, &["stop", "t", "--timeout", "1"]);
            vm(&state, &["start", "t"]);
        }
        vm(&state, &["kill", "t"]);
        vm(&state, &["start", "t"]);
        qemu_io_inside(&vm_dir, "write -P 0xee 396M 4M");
        let (after_kill, read, err) = backup(&repo, &state);
        assert_eq!(read, ALLOCATED, "{err}");
        assert!(
            err.contains("reading the whole disk") && err.contains(reason),
            "{err}"
        );
        restores_to_disk(&repo, &after_kill, d, dir);
    }
    qemu_io_inside(&vm_dir, "write -P 0xef 8M 4k");
    let (_, read, err) = backup(&repo, &state);
    assert_eq!(read, 4 * MIB, "{err}");

    restic_check(&repo);
    strata_verify(&repo);
}
