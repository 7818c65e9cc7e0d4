//! `strata backup verify|prune|gc|stats` and partial restores, against the real
//! `restic`: after each of them `restic check --read-data` passes and restic
//! lists and restores the same snapshots and bytes as strata; prune keeps exactly
//! the snapshots `restic forget` keeps under the same policy; damage is named
//! down to the blob, the pack, and the snapshot, file and offset it breaks. The
//! repository and password come from strata's or restic's variables, and every
//! long job draws a progress bar on a terminal only.

mod common;

use common::restic::*;
use std::collections::HashMap;
use std::path::Path;

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// Back up `content` (written to `disk`); the new snapshot's full ID and the
/// disk as a guest sees it (a raw file's size rounds up to 512 bytes).
fn backup(repo: &Path, disk: &Path, content: &[u8]) -> (String, Vec<u8>) {
    std::fs::write(disk, content).unwrap();
    let short = saved_id(&run(strata(&["create", "--repo", s(repo), s(disk)])));
    (full_id(repo, &short), guest_view(disk))
}

#[test]
fn verify_prune_gc_and_stats_keep_the_repository_sound_for_restic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let disk = d.join("disk.raw");
    run(strata(&["init", "--repo", s(&repo)]));
    let mut content = raw_disk(&disk);
    let mut made = HashMap::new();
    for round in 0..3 {
        // Each version rewrites 3 MiB: its old blobs are garbage once forgotten.
        content[(round * 8 + 1) * MIB..(round * 8 + 4) * MIB].copy_from_slice(&noise(3 * MIB));
        let (id, view) = backup(&repo, &disk, &content);
        made.insert(id, view);
    }

    let st = json(&run(strata(&[
        "stats",
        "--repo",
        s(&repo),
        "--output=json",
    ])));
    assert_eq!(st["snapshots"], 3);
    let disk_size = guest_view(&disk).len() as u64;
    assert_eq!(st["logical_bytes"], 3 * disk_size);
    let unique = st["unique_bytes"].as_u64().unwrap();
    assert!(unique < 2 * content.len() as u64, "{st}");
    assert!(st["dedup_factor"].as_f64().unwrap() > 1.5, "{st}");
    assert!(st["compression_factor"].as_f64().unwrap() > 1.0, "{st}");
    strata_verify(&repo);

    // A dry run names each snapshot's fate and the rule, and changes nothing.
    let before: Vec<_> = std::fs::read_dir(repo.join("snapshots")).unwrap().collect();
    let plan = json(&run(strata(&[
        "prune",
        "--repo",
        s(&repo),
        "--keep-last",
        "2",
        "--dry-run",
        "--output=json",
    ])));
    let snaps = plan["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 3);
    assert_eq!(snaps[0]["keep"], false);
    assert_eq!(snaps[0]["reasons"], serde_json::json!([]));
    for kept in &snaps[1..] {
        assert_eq!(kept["keep"], true);
        assert_eq!(kept["reasons"], serde_json::json!(["last snapshot"]));
    }
    assert!(
        plan["gc"]["packs_repacked"].as_u64().unwrap()
            + plan["gc"]["packs_removed"].as_u64().unwrap()
            > 0
    );
    let after: Vec<_> = std::fs::read_dir(repo.join("snapshots")).unwrap().collect();
    assert_eq!(before.len(), after.len());
    let human = stdout(&run(strata(&[
        "prune",
        "--repo",
        s(&repo),
        "--keep-last",
        "2",
        "--dry-run",
    ])));
    assert!(
        human.contains("remove  ") && human.contains("(last snapshot)"),
        "{human}"
    );

    run(strata(&["prune", "--repo", s(&repo), "--keep-last", "2"]));
    made.retain(|id, _| snapshot_ids(&repo).contains(id));
    assert_eq!(made.len(), 2);
    restic_check(&repo);
    strata_verify(&repo);
    assert_eq!(restic_snapshot_ids(&repo), snapshot_ids(&repo));
    all_restore(&repo, &made);
    for (id, want) in &made {
        let dumped = run(restic(&repo, &["dump", id, "/disk.raw"]));
        assert!(dumped.stdout == *want, "restic dump of {id} differs");
    }
    let st2 = json(&run(strata(&[
        "stats",
        "--repo",
        s(&repo),
        "--output=json",
    ])));
    assert!(st2["repository_bytes"].as_u64() < st["repository_bytes"].as_u64());

    // restic forgets one more; strata's gc collects what it leaves.
    let oldest = &snapshot_ids(&repo)
        .into_iter()
        .find(|id| made[id] != guest_view(&disk))
        .unwrap();
    run(restic(&repo, &["forget", oldest]));
    made.remove(oldest);
    let dry = json(&run(strata(&[
        "gc",
        "--repo",
        s(&repo),
        "--dry-run",
        "--output=json",
    ])));
    assert!(dry["blobs_removed"].as_u64().unwrap() > 0, "{dry}");
    let done = json(&run(strata(&["gc", "--repo", s(&repo), "--output=json"])));
    assert_eq!(done["blobs_removed"], dry["blobs_removed"]);
    let again = json(&run(strata(&["gc", "--repo", s(&repo), "--output=json"])));
    assert_eq!(again["blobs_removed"], 0, "{again}");
    assert_eq!(again["packs_kept"], again["packs"], "{again}");
    restic_check(&repo);
    strata_verify(&repo);
    all_restore(&repo, &made);
    let target = d.join("restic-out");
    run(restic(
        &repo,
        &["restore", "latest", "--target", s(&target)],
    ));
    assert!(std::fs::read(target.join("disk.raw")).unwrap() == guest_view(&disk));
}

/// restic backups of a tiny file at `times` (written in `tz`), on one host and path.
fn restic_backups_at(repo: &Path, tz: &str, times: &[&str]) {
    for t in times {
        let mut c = restic(
            repo,
            &[
                "backup",
                "--stdin",
                "--stdin-filename",
                "f",
                "--host",
                "h",
                "--time",
                t,
            ],
        );
        c.env("TZ", tz).stdin(std::process::Stdio::piped());
        let mut child = c.stdout(std::process::Stdio::null()).spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(t.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn prune_keeps_exactly_the_snapshots_restic_forget_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    run(restic(&repo, &["init"]));
    // Hours, days, ISO weeks, months and years; written in a zone whose offset
    // moves some snapshots to another day than in UTC.
    restic_backups_at(
        &repo,
        "America/New_York",
        &[
            "2019-12-31 23:30:00",
            "2020-12-31 12:00:00",
            "2021-01-03 23:59:00",
            "2021-01-04 00:01:00",
            "2022-06-30 21:00:00",
            "2022-07-01 02:00:00",
            "2023-03-11 22:00:00",
            "2023-03-12 09:00:00",
            "2023-03-12 09:40:00",
            "2023-03-12 10:05:00",
            "2023-03-12 23:10:00",
            "2023-03-13 00:10:00",
        ],
    );
    let policies: [&[&str]; 9] = [
        &["--keep-last", "3"],
        &["--keep-hourly", "4"],
        &["--keep-daily", "5"],
        &["--keep-weekly", "4"],
        &["--keep-monthly", "5"],
        &["--keep-yearly", "3"],
        &[
            "--keep-last",
            "1",
            "--keep-daily",
            "3",
            "--keep-yearly",
            "10",
        ],
        &[
            "--keep-hourly",
            "2",
            "--keep-weekly",
            "2",
            "--keep-monthly",
            "2",
        ],
        &["--keep-daily", "100"],
    ];
    for policy in policies {
        let mut args = vec!["forget", "--dry-run", "--json"];
        args.extend(policy);
        let theirs: serde_json::Value = json(&run(restic(&repo, &args)));
        let mut restic_keep: Vec<String> = theirs[0]["keep"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        restic_keep.sort();
        let mut args = vec!["prune", "--repo", s(&repo), "--dry-run", "--output=json"];
        args.extend(policy);
        let ours = json(&run(strata(&args)));
        let mut strata_keep: Vec<String> = ours["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["keep"] == true)
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        strata_keep.sort();
        assert_eq!(strata_keep, restic_keep, "policy {policy:?}");
        // The reasons agree too.
        for r in theirs[0]["reasons"].as_array().unwrap() {
            let time = r["snapshot"]["time"].as_str().unwrap();
            let mine = ours["snapshots"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["time"] == time)
                .unwrap();
            assert_eq!(mine["reasons"], r["matches"], "policy {policy:?} at {time}");
        }
    }
    let refused = strata(&["prune", "--repo", s(&repo)]).output().unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no keep rule given"));
    run(strata(&["prune", "--repo", s(&repo), "--keep-daily", "2"]));
    assert_eq!(snapshot_ids(&repo).len(), 2);
    restic_check(&repo);
}

#[test]
fn a_flipped_byte_is_named_by_verify_with_what_it_breaks_and_restore_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let disk = d.join("disk.raw");
    run(strata(&["init", "--repo", s(&repo)]));
    let content = noise(24 * MIB);
    let (first, _) = backup(&repo, &disk, &content);
    // The second version differs in chunk 0 only: once the first is forgotten,
    // the first pack holds garbage and gc must repack it.
    let mut second_content = content.clone();
    second_content[..MIB].fill(7);
    let (second, _) = backup(&repo, &disk, &second_content);

    // One pack holds the data: flip a byte inside its third blob (noise does not
    // compress, so blob k starts near k * (4 MiB + 32)).
    let mut packs: Vec<(u64, std::path::PathBuf)> = Vec::new();
    for sub in std::fs::read_dir(repo.join("data")).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let f = f.unwrap();
            packs.push((f.metadata().unwrap().len(), f.path()));
        }
    }
    let (_, pack) = packs.into_iter().max().unwrap();
    let pack_name = pack.file_name().unwrap().to_str().unwrap().to_string();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[2 * 4 * MIB + 1000] ^= 0x40;
    std::fs::write(&pack, bytes).unwrap();

    let out = strata(&["verify", "--repo", s(&repo)]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("problems found"), "{err}");
    assert!(text.contains(&pack_name), "{text}");
    // Each line names the damaged pack once, however many things it says of it.
    for line in text.lines() {
        assert!(line.matches(&pack_name).count() <= 1, "{line}");
    }
    assert!(text.contains("authentication failed"), "{text}");
    for id in [&first, &second] {
        assert!(
            text.contains(&format!(
                "breaks snapshot {} file /disk.raw at offset {}",
                &id[..8],
                8 * MIB
            )),
            "{text}"
        );
    }
    let report = json(
        &strata(&["verify", "--repo", s(&repo), "--output=json"])
            .output()
            .unwrap(),
    );
    let blob_problems: Vec<&serde_json::Value> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["blob"].is_null())
        .collect();
    assert_eq!(blob_problems.len(), 1, "{report}");
    let p = blob_problems[0];
    assert_eq!(p["pack"], pack_name.as_str());
    assert_eq!(p["type"], "data");
    assert_eq!(p["breaks"].as_array().unwrap().len(), 2);
    let blob = p["blob"].as_str().unwrap().to_string();
    // The pack as a whole no longer matches its name either.
    assert!(report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["blob"].is_null()));

    // Restore stops at the blob, names it and the offset, and leaves no output.
    let target = d.join("out.raw");
    let failed = strata(&["restore", "--repo", s(&repo), &first[..8], s(&target)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&blob) && err.contains(&format!("at file offset {}", 8 * MIB)),
        "{err}"
    );
    assert!(!target.exists());
    // A range that avoids the blob restores; one that touches it fails.
    run(strata(&[
        "restore",
        "--repo",
        s(&repo),
        &first[..8],
        s(&target),
        "--offset",
        "0",
        "--length",
        &(8 * MIB).to_string(),
    ]));
    assert!(std::fs::read(&target).unwrap() == content[..8 * MIB]);
    let failed = strata(&[
        "restore",
        "--repo",
        s(&repo),
        &first[..8],
        s(&target),
        "--offset",
        &(12 * MIB - 1).to_string(),
        "--length",
        "2",
    ])
    .output()
    .unwrap();
    assert_eq!(failed.status.code(), Some(1));
    assert!(!target.exists());
    // A sample that reads the damaged pack finds it; gc refuses to move it.
    let sample = strata(&["verify", "--repo", s(&repo), "--read-data-subset", "100%"])
        .output()
        .unwrap();
    assert_eq!(sample.status.code(), Some(1));
    let structural = run(strata(&["verify", "--repo", s(&repo), "--no-read-data"]));
    assert!(
        stdout(&structural).contains("0 read"),
        "{}",
        stdout(&structural)
    );
    run(restic(&repo, &["forget", &first]));
    let gc = strata(&["gc", "--repo", s(&repo)]).output().unwrap();
    let gc_err = String::from_utf8_lossy(&gc.stderr);
    assert_eq!(gc.status.code(), Some(1), "{gc_err}");
    assert!(
        gc_err.contains("gc stopped before removing anything") && gc_err.contains(&blob),
        "{gc_err}"
    );
    assert!(pack.exists());
}

#[test]
fn a_byte_range_restores_alone_or_into_an_existing_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let top = qcow2_chain(d);
    let want = guest_view(&top);
    run(strata(&["init", "--repo", s(&repo)]));
    run(strata(&["create", "--repo", s(&repo), "-U", s(&top)]));

    // A range across chunk boundaries, one inside a zeroed region, the whole
    // disk and one of whole MiBs; whole MiBs are written with a suffix (1M), as
    // the README writes them.
    let arg = |n: usize| match n {
        n if n > 0 && n % MIB == 0 => format!("{}M", n / MIB),
        n => n.to_string(),
    };
    for (offset, length) in [
        (3 * MIB - 17, 9 * MIB + 33),
        (31 * MIB, 1000),
        (0, want.len()),
        (MIB, 2 * MIB),
    ] {
        let out = d.join("range.raw");
        run(strata(&[
            "restore",
            "--repo",
            s(&repo),
            "latest",
            s(&out),
            "--offset",
            &arg(offset),
            "--length",
            &arg(length),
        ]));
        assert!(
            std::fs::read(&out).unwrap() == want[offset..offset + length],
            "range {offset}+{length}"
        );
    }
    let bad = strata(&[
        "restore",
        "--repo",
        s(&repo),
        "latest",
        s(&d.join("x.raw")),
        "--offset",
        &(want.len() - 10).to_string(),
        "--length",
        "11",
    ])
    .output()
    .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not inside"));

    // An existing qcow2 full of other data becomes the backup, zeroes included.
    let existing = d.join("existing.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        s(&existing),
        &want.len().to_string(),
    ]);
    run(std::process::Command::new("qemu-io").args(["-c", "write -P 0x33 0 39M", s(&existing)]));
    run(strata(&[
        "restore",
        "--repo",
        s(&repo),
        "latest",
        s(&existing),
        "--existing",
    ]));
    qemu_img(&["check", s(&existing)]);
    assert!(guest_view(&existing) == want);

    // A range into an existing raw image changes that range only.
    let raw = d.join("existing.raw");
    let mut other = vec![0x44u8; want.len()];
    std::fs::write(&raw, &other).unwrap();
    let (offset, length) = (5 * MIB + 3, 2 * MIB);
    run(strata(&[
        "restore",
        "--repo",
        s(&repo),
        "latest",
        s(&raw),
        "--existing",
        "--offset",
        &offset.to_string(),
        "--length",
        &length.to_string(),
    ]));
    other[offset..offset + length].copy_from_slice(&want[offset..offset + length]);
    assert!(std::fs::read(&raw).unwrap() == other);
    // An existing image too small for the range is refused and left alone.
    let small = d.join("small.raw");
    std::fs::write(&small, vec![1u8; MIB]).unwrap();
    let refused = strata(&[
        "restore",
        "--repo",
        s(&repo),
        "latest",
        s(&small),
        "--existing",
    ])
    .output()
    .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("too small"));
    assert!(std::fs::read(&small).unwrap() == vec![1u8; MIB]);
}

#[test]
fn a_missing_repository_or_a_full_disk_fails_clearly_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = strata(&["verify", "--repo", s(&d.join("nowhere"))])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no repository at"));

    // A 24 MiB file system: the first backup fits, the second (new noise) does not.
    let fs = d.join("small-fs");
    std::fs::create_dir(&fs).unwrap();
    run(std::process::Command::new("mount").args([
        "-t",
        "tmpfs",
        "-o",
        "size=24m",
        "tmpfs",
        s(&fs),
    ]));
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&fs);
    let repo = fs.join("repo");
    let disk = d.join("disk.raw");
    run(strata(&["init", "--repo", s(&repo)]));
    let content = noise(12 * MIB);
    let (first, view) = backup(&repo, &disk, &content);
    std::fs::write(&disk, noise(20 * MIB)).unwrap();
    let full = strata(&["create", "--repo", s(&repo), s(&disk)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&full.stderr);
    assert_eq!(full.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(snapshot_ids(&repo), vec![first.clone()]);
    assert_eq!(
        std::fs::read_dir(repo.join("tmp")).unwrap().count(),
        0,
        "temporary files left"
    );
    restic_check(&repo);
    // gc makes the room back, and the first backup still restores.
    run(strata(&["gc", "--repo", s(&repo)]));
    strata_verify(&repo);
    all_restore(&repo, &HashMap::from([(first, view)]));
}

#[test]
fn a_served_backup_reads_as_the_disk_over_nbd_and_holds_off_gc() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let top = qcow2_chain(d);
    let reference = d.join("ref.raw");
    std::fs::write(&reference, guest_view(&top)).unwrap();
    run(strata(&["init", "--repo", s(&repo)]));
    run(strata(&["create", "--repo", s(&repo), "-U", s(&top)]));
    let sock = d.join("backup.sock");
    let mut server = serve(&repo, "latest", &sock, "disk");
    let url = format!("nbd+unix:///disk?socket={}", s(&sock));
    qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&reference), &url]);
    // The zeroed ranges are reported as zeroes, not data.
    let map = qemu_img(&["map", "--output=json", "-f", "raw", &url]);
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    assert!(
        map.as_array().unwrap().iter().any(|e| e["zero"] == true),
        "{map}"
    );
    let copy = d.join("copy.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &url, s(&copy)]);
    qemu_img(&["compare", "-F", "raw", s(&copy), s(&reference)]);
    let write = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &url])
        .output()
        .unwrap();
    assert!(
        !write.status.success() || String::from_utf8_lossy(&write.stdout).contains("failed"),
        "a write to the served backup succeeded"
    );
    // While it serves, gc (exclusive) is refused; afterwards it runs.
    let gc = strata(&["gc", "--repo", s(&repo)]).output().unwrap();
    assert_eq!(gc.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&gc.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    // SAFETY: the child is ours and has not been waited for.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert!(server.wait().unwrap().success());
    assert!(!sock.exists());
    run(strata(&["gc", "--repo", s(&repo)]));
    restic_check(&repo);
}

#[test]
fn the_repository_and_password_come_from_strata_or_restic_variables_as_restic_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let pw = d.join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    run(strata(&["init", "--repo", s(&repo)]));
    let list = |vars: &[(&str, &str)]| {
        let mut c = strata(&["list"]);
        c.env_remove("STRATA_PASSWORD");
        c.envs(vars.iter().copied());
        c.output().unwrap()
    };
    for vars in [
        [
            ("STRATA_REPOSITORY", s(&repo)),
            ("STRATA_PASSWORD", PASSWORD),
        ],
        [
            ("RESTIC_REPOSITORY", s(&repo)),
            ("RESTIC_PASSWORD", PASSWORD),
        ],
        [
            ("RESTIC_REPOSITORY", s(&repo)),
            ("RESTIC_PASSWORD_FILE", s(&pw)),
        ],
    ] {
        let o = list(&vars);
        assert!(
            o.status.success(),
            "{vars:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(stdout(&o).ends_with("0 snapshots\n"), "{}", stdout(&o));
    }
    // restic prefers RESTIC_PASSWORD_FILE to RESTIC_PASSWORD, and so does strata;
    // an empty STRATA_PASSWORD counts as unset, as an empty RESTIC_PASSWORD does in restic.
    let both = [
        ("RESTIC_REPOSITORY", s(&repo)),
        ("STRATA_PASSWORD", ""),
        ("RESTIC_PASSWORD", "not it"),
        ("RESTIC_PASSWORD_FILE", s(&pw)),
    ];
    let o = list(&both);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut r = std::process::Command::new("restic");
    r.args(["--no-cache", "snapshots"]).envs(both);
    run(r);
    // Neither given: the error names every way to give them.
    let o = list(&[]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("STRATA_REPOSITORY or RESTIC_REPOSITORY"),
        "{err}"
    );
    let o = list(&[("STRATA_REPOSITORY", s(&repo))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("RESTIC_PASSWORD_FILE or RESTIC_PASSWORD"),
        "{err}"
    );
}

/// `strata backup ARGS` run as [`strata`] runs it (its environment), with a
/// terminal as its stdout and stderr (through `script`); what the terminal showed.
fn on_a_terminal(args: &[&str]) -> String {
    let plain = strata(args);
    let line = std::iter::once(plain.get_program())
        .chain(plain.get_args())
        .map(|a| a.to_str().unwrap())
        .collect::<Vec<_>>()
        .join(" ");
    let mut c = std::process::Command::new("script");
    c.args(["-q", "-e", "-c", &line, "/dev/null"]);
    for (k, v) in plain.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    stdout(&run(c))
}

#[test]
fn every_long_job_draws_a_progress_bar_on_a_terminal_and_none_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let disk = d.join("disk.raw");
    run(strata(&["init", "--repo", s(&repo)]));
    std::fs::write(&disk, noise(6 * MIB)).unwrap();
    let out = d.join("out.raw");
    let jobs: [&[&str]; 5] = [
        &["create", s(&disk)],
        &["restore", "latest", s(&out)],
        &["verify"],
        &["prune", "--keep-last", "1"],
        &["gc"],
    ];
    for job in jobs {
        let args: Vec<&str> = job.iter().chain(&["--repo", s(&repo)]).copied().collect();
        let shown = on_a_terminal(&args);
        assert!(shown.contains("(100/100%) [="), "{job:?}: {shown}");
        let piped = run(strata(&args));
        let err = String::from_utf8_lossy(&piped.stderr);
        assert!(
            !err.contains("100%"),
            "{job:?} drew a bar into a pipe: {err}"
        );
    }
}
