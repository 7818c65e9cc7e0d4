//! `strata backup` against the real `restic` (Debian's package; the tests fail if it
//! is missing): restic lists, checks (reading every blob) and restores what strata
//! backs up, byte for byte what `qemu-img convert -O raw` reads from the source
//! chain; strata lists and restores what restic backs up; and damage or a wrong
//! password fail loudly in both.

mod common;

use common::restic::*;
use std::path::PathBuf;

#[test]
fn restic_lists_checks_and_restores_what_strata_backed_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let top = qcow2_chain(d);
    let want = guest_view(&top);
    let reference = d.join("ref.raw");
    std::fs::write(&reference, &want).unwrap();

    run(strata(&["init", "--repo", s(&repo)]));
    let id = saved_id(&run(strata(&["create", "--repo", s(&repo), "-U", s(&top)])));

    let listed = snapshots_json(&run(restic(&repo, &["snapshots", "--json"])));
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["short_id"], id.as_str());
    assert_eq!(
        listed[0]["paths"][0],
        s(&std::fs::canonicalize(&top).unwrap())
    );
    let check = run(restic(&repo, &["check", "--read-data"]));
    assert!(
        stdout(&check).contains("no errors were found"),
        "{}",
        stdout(&check)
    );

    let dumped = run(restic(&repo, &["dump", &id, "/top.qcow2"]));
    assert!(dumped.stdout == want, "restic dump differs from the source");
    let target = d.join("restic-out");
    run(restic(&repo, &["restore", &id, "--target", s(&target)]));
    assert!(std::fs::read(target.join("top.qcow2")).unwrap() == want);

    restores_raw_and_qcow2(&repo, &id, &reference);

    // restic backs up into the repository strata made (its key, config and
    // chunker polynomial), and strata restores that backup too.
    run(restic(
        &repo,
        &["backup", "--stdin", "--stdin-filename", "again.raw"],
    )
    .stdin(std::fs::File::open(&reference).unwrap()));
    run(restic(&repo, &["check", "--read-data"]));
    let listed = snapshots_json(&run(strata(&["list", "--repo", s(&repo), "--output=json"])));
    let theirs = listed
        .iter()
        .find(|s| s["paths"][0] == "/again.raw")
        .unwrap();
    let out = d.join("again.raw");
    let id = theirs["short_id"].as_str().unwrap();
    run(strata(&["restore", "--repo", s(&repo), id, s(&out)]));
    assert!(
        std::fs::read(&out).unwrap() == want,
        "restic's backup restores differently"
    );
}

#[test]
fn strata_lists_and_restores_what_restic_backed_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let raw = d.join("disk.raw");
    let want = raw_disk(&raw);
    run(restic(&repo, &["init"]));
    run(restic(
        &repo,
        &["backup", "--stdin", "--stdin-filename", "disk.raw"],
    )
    .stdin(std::fs::File::open(&raw).unwrap()));
    run(restic(&repo, &["backup", s(&raw)]));
    let theirs = snapshots_json(&run(restic(&repo, &["snapshots", "--json"])));
    let ours = snapshots_json(&run(strata(&["list", "--repo", s(&repo), "--output=json"])));
    let ids = |v: &[serde_json::Value]| -> Vec<String> {
        let mut ids: Vec<String> = v
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&ours), ids(&theirs));
    assert_eq!(ours.len(), 2);
    for (i, snap) in ours.iter().enumerate() {
        let out = d.join(format!("out{i}.raw"));
        let id = snap["short_id"].as_str().unwrap();
        run(strata(&["restore", "--repo", s(&repo), id, s(&out)]));
        assert!(
            std::fs::read(&out).unwrap() == want,
            "restore of {id} differs"
        );
    }
}

#[test]
fn a_wrong_password_or_a_damaged_pack_fails_loudly_in_strata_and_restic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let raw = d.join("disk.raw");
    raw_disk(&raw);
    // The repository from RESTIC_REPOSITORY, the password from a file.
    let pw = d.join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let with_env = |args: &[&str]| {
        let mut c = strata(args);
        c.env("RESTIC_REPOSITORY", &repo)
            .env_remove("STRATA_PASSWORD");
        c.arg("--password-file").arg(&pw);
        c
    };
    run(with_env(&["init"]));
    run(with_env(&["create", s(&raw)]));

    // An incremental naming chunk 2 as changed reads it alone and restores the new bytes.
    let mut changed = std::fs::read(&raw).unwrap();
    changed[2 * 4 * MIB + 100..2 * 4 * MIB + 200].fill(0xee);
    std::fs::write(&raw, &changed).unwrap();
    let inc = run(with_env(&[
        "create",
        "--parent",
        "latest",
        "--changed-chunks",
        "2",
        s(&raw),
    ]));
    assert!(
        stdout(&inc).contains(" 9 reused), 4194304 bytes read,"),
        "{}",
        stdout(&inc)
    );
    let out = d.join("inc.raw");
    run(with_env(&["restore", "latest", s(&out)]));
    assert!(std::fs::read(&out).unwrap() == guest_view(&raw));
    std::fs::remove_file(&out).unwrap();

    let wrong = strata(&["list", "--repo", s(&repo)])
        .env("STRATA_PASSWORD", "guess")
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong password"));

    // Flip a byte in the middle of the largest pack (blob data, not its header).
    let mut packs: Vec<(u64, PathBuf)> = Vec::new();
    for sub in std::fs::read_dir(repo.join("data")).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let f = f.unwrap();
            packs.push((f.metadata().unwrap().len(), f.path()));
        }
    }
    let (len, pack) = packs.into_iter().max().unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[len as usize / 2] ^= 1;
    std::fs::write(&pack, bytes).unwrap();

    let out = d.join("out.raw");
    let failed = with_env(&["restore", "latest", s(&out)]).output().unwrap();
    let err = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{err}");
    assert!(
        err.contains("blob ") && err.contains("at file offset "),
        "{err}"
    );
    assert!(err.contains("authentication failed"), "{err}");
    assert!(!out.exists());
    let check = restic(&repo, &["check", "--read-data"]).output().unwrap();
    assert!(
        !check.status.success(),
        "restic check passed a damaged pack"
    );
}

#[test]
fn strata_restores_after_restic_forgets_and_prunes_its_backups() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let raw = d.join("disk.raw");
    let mut content = raw_disk(&raw);
    run(strata(&["init", "--repo", s(&repo)]));
    run(strata(&["create", "--repo", s(&repo), s(&raw)]));
    // Rewrite 3 MiB of noise: the first snapshot's blobs there become garbage
    // once it is forgotten, so prune repacks the packs they share.
    content[MIB..4 * MIB].copy_from_slice(&noise(3 * MIB));
    std::fs::write(&raw, &content).unwrap();
    let id = saved_id(&run(strata(&["create", "--repo", s(&repo), s(&raw)])));
    let prune = run(restic(&repo, &["forget", "--keep-last", "1", "--prune"]));
    assert!(stdout(&prune).contains("repacking"), "{}", stdout(&prune));
    run(restic(&repo, &["check", "--read-data"]));
    let listed = snapshots_json(&run(strata(&["list", "--repo", s(&repo), "--output=json"])));
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["short_id"], id.as_str());
    let out = d.join("out.raw");
    run(strata(&["restore", "--repo", s(&repo), "latest", s(&out)]));
    assert!(std::fs::read(&out).unwrap() == guest_view(&raw));
}

/// Rounds of the kill test (`STRATA_BACKUP_KILL_ROUNDS`, default 5).
fn kill_rounds() -> u64 {
    env_count("STRATA_BACKUP_KILL_ROUNDS", 5)
}

#[test]
fn backups_killed_midway_leave_only_whole_snapshots_and_a_sound_repository() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let raw = d.join("disk.raw");
    let mut content = noise(40 * MIB);
    content.extend(noise(8 * MIB));
    std::fs::write(&raw, &content).unwrap();
    let want = guest_view(&raw);
    run(strata(&["init", "--repo", s(&repo)]));
    let mut finished = 0;
    let mut killed = 0;
    for round in 0..kill_rounds() {
        let mut child = strata(&["create", "--repo", s(&repo), s(&raw)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Spread the kills over the backup: before, during and after its packs.
        std::thread::sleep(std::time::Duration::from_millis(150 + 300 * (round % 5)));
        // SAFETY: the child is ours and has not been waited for.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        if status.success() {
            finished += 1;
        } else {
            killed += 1;
        }
        let listed = snapshots_json(&run(strata(&["list", "--repo", s(&repo), "--output=json"])));
        assert_eq!(
            listed.len(),
            finished,
            "round {round}: a snapshot of a killed backup is visible"
        );
        // A killed backup's lock stays behind: restic's `unlock` removes it as stale
        // (same host, dead process), as strata's next backup ignores it.
        run(restic(&repo, &["unlock"]));
        let locks = std::fs::read_dir(repo.join("locks")).unwrap().count();
        assert_eq!(
            locks, 0,
            "round {round}: restic kept a lock it should find stale"
        );
        run(restic(&repo, &["check", "--read-data"]));
    }
    let packs: usize = std::fs::read_dir(repo.join("data"))
        .unwrap()
        .map(|sub| std::fs::read_dir(sub.unwrap().path()).unwrap().count())
        .sum();
    eprintln!("{killed} backups killed, {finished} finished first, {packs} packs left behind");
    let id = saved_id(&run(strata(&["create", "--repo", s(&repo), s(&raw)])));
    let out = d.join("out.raw");
    run(strata(&["restore", "--repo", s(&repo), &id, s(&out)]));
    assert!(std::fs::read(&out).unwrap() == want);
}

#[test]
fn a_disk_in_1_mib_chunks_restores_serves_verifies_and_reads_in_restic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let disk = d.join("disk.raw");
    raw_disk(&disk);
    let mut want = guest_view(&disk);
    let reference = d.join("ref.raw");
    std::fs::write(&reference, &want).unwrap();
    run(strata(&["init", "--repo", s(&repo)]));
    let made = stdout(&run(strata(&[
        "create",
        "--repo",
        s(&repo),
        "--chunk-size",
        "1M",
        s(&disk),
    ])));
    assert!(made.contains(" in 40 chunks of 1 MiB "), "{made}");

    restic_check(&repo);
    strata_verify(&repo);
    let target = d.join("restic-out");
    run(restic(
        &repo,
        &["restore", "latest", "--target", s(&target)],
    ));
    assert!(std::fs::read(target.join("disk.raw")).unwrap() == want);
    restores_raw_and_qcow2(&repo, "latest", &reference);
    let out = d.join("out.raw");
    let sock = d.join("backup.sock");
    let mut server = serve(&repo, "latest", &sock, "disk");
    let url = format!("nbd+unix:///disk?socket={}", s(&sock));
    qemu_img(&["compare", "-f", "raw", "-F", "raw", &url, s(&reference)]);
    // SAFETY: the child is ours and has not been waited for.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert!(server.wait().unwrap().success());

    // New data in chunk 7 (a zero run before): the incremental keeps the
    // parent's 1 MiB chunks and reads that one only.
    let new = noise(MIB);
    want[7 * MIB..8 * MIB].copy_from_slice(&new);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &new, 7 * MIB as u64).unwrap();
    let inc = run(strata(&[
        "create",
        "--repo",
        s(&repo),
        "--parent",
        "latest",
        "--changed-chunks",
        "7",
        s(&disk),
    ]));
    let text = stdout(&inc);
    assert!(
        text.contains("chunks of 1 MiB (0 zero, 39 reused), 1048576 bytes read"),
        "{text}"
    );
    // Another chunk size than the parent's reads everything, and says so.
    let other = run(strata(&[
        "create",
        "--repo",
        s(&repo),
        "--parent",
        "latest",
        "--changed-chunks",
        "7",
        "--chunk-size",
        "4M",
        s(&disk),
    ]));
    let (text, err) = (stdout(&other), String::from_utf8_lossy(&other.stderr));
    assert!(
        text.contains(" in 10 chunks of 4 MiB (") && text.contains(" 0 reused)"),
        "{text}"
    );
    assert!(
        err.contains("reading the whole disk") && err.contains("1 MiB chunks"),
        "{err}"
    );
    restic_check(&repo);
    for snap in ["latest", &saved_id(&inc)] {
        run(strata(&["restore", "--repo", s(&repo), snap, s(&out)]));
        assert!(
            std::fs::read(&out).unwrap() == want,
            "{snap} restores other bytes"
        );
    }
}
