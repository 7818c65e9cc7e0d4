//! `strata backup create --parent P --bitmap NAME IMAGE` on a qcow2 at rest,
//! against the real QEMU tools (missing, the test fails): QEMU records the
//! changes in the image's persistent bitmap (`qemu-img bitmap --add`, then
//! `qemu-io` writes), strata reads only the chunks it marks (bytes read
//! counted), clears it once the snapshot is stored, and QEMU goes on recording
//! into the bitmap strata cleared. Every snapshot restores to the image as
//! QEMU reads it, `restic check --read-data` passes, `qemu-img check` is
//! clean. Unusable bitmaps (absent, disabled, in use after a QEMU killed,
//! of another size) mean a full read said on stderr and an image left as it
//! was; a strata killed between storing the snapshot and clearing the bitmap
//! leaves a bitmap that still marks every change.

mod common;

use common::restic::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// `strata backup create --repo REPO ARGS IMAGE`: its output, whatever the status.
fn create(repo: &Path, image: &Path, args: &[&str]) -> Output {
    let mut a = vec!["create", "--repo", s(repo)];
    a.extend(args);
    a.push(s(image));
    strata(&a).output().expect("strata runs")
}

/// [`create`], which must succeed.
fn created(repo: &Path, image: &Path, args: &[&str]) -> Output {
    let out = create(repo, image, args);
    assert!(
        out.status.success(),
        "backup {args:?} failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The bytes strata says it read from the image.
fn bytes_read(o: &Output) -> u64 {
    let text = stdout(o);
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = words
        .windows(3)
        .position(|w| w[1] == "bytes" && w[2] == "read,")
        .unwrap_or_else(|| panic!("no 'N bytes read' in {text}"));
    words[at].parse().unwrap()
}

/// Run qemu-io commands on the qcow2 `image` (QEMU stores its bitmaps when it closes it).
fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(s(image)));
}

/// The flags `qemu-img info` shows for bitmap `name` of `image` (`None`: no such bitmap).
fn bitmap_flags(image: &Path, name: &str) -> Option<Vec<String>> {
    let out = qemu_img(&["info", "-U", "--output=json", s(image)]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bitmaps = info["format-specific"]["data"]["bitmaps"].as_array()?;
    let b = bitmaps.iter().find(|b| b["name"] == name)?;
    Some(
        b["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect(),
    )
}

/// `qemu-img check` finds no corruption (leaks, exit 3, are allowed when `leaks_ok`).
fn checks_clean(image: &Path, leaks_ok: bool) {
    let out = Command::new("qemu-img")
        .args(["check", s(image)])
        .output()
        .expect("qemu-img runs");
    let code = out.status.code();
    assert!(
        code == Some(0) || (leaks_ok && code == Some(3)),
        "qemu-img check {}: {code:?} {}{}",
        image.display(),
        stdout(&out),
        stderr(&out)
    );
}

/// Snapshot `id` restores, through strata, to the disk QEMU reads in `image`.
fn restores_to_image(repo: &Path, id: &str, image: &Path) {
    let out = image.with_extension("restored.raw");
    run(strata(&["restore", "--repo", s(repo), id, s(&out)]));
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&out), s(image)]);
    std::fs::remove_file(&out).unwrap();
}

/// A 200 MiB qcow2 with data in three places and bitmap `b0` added after it,
/// an initialised repository and a full backup of the image (its ID).
fn image_with_bitmap_and_full_backup(d: &Path) -> (PathBuf, PathBuf, String) {
    let repo = d.join("repo");
    run(strata(&["init", "--repo", s(&repo)]));
    let (img, full) = image_with_bitmap_backed_up(d, &repo);
    (img, repo, full)
}

/// The image of [`image_with_bitmap_and_full_backup`] and its full backup in `repo`.
fn image_with_bitmap_backed_up(d: &Path, repo: &Path) -> (PathBuf, String) {
    let img = d.join("disk.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "200M"]);
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 8M",
            "write -P 0x22 100M 7M",
            "write -P 0x33 150M 3M",
        ],
    );
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    let full = created(repo, &img, &[]);
    assert_eq!(bytes_read(&full), allocated(&img));
    (img, saved_id(&full))
}

#[test]
fn incrementals_read_only_the_chunks_the_qcow2_bitmap_marks_and_clear_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, repo, full) = image_with_bitmap_and_full_backup(d);

    // 2 % of the disk in two 4 MiB chunks: 1 MiB in chunk 12, 3 MiB in chunk 25.
    qemu_io(&img, &["write -P 0x44 50M 1M", "write -P 0x55 100M 3M"]);
    let inc = created(&repo, &img, &["--parent", "latest", "--bitmap", "b0"]);
    assert!(!stderr(&inc).contains("whole disk"), "{}", stderr(&inc));
    assert!(
        stdout(&inc).contains("bitmap 'b0' cleared"),
        "{}",
        stdout(&inc)
    );
    // Chunk 12's data is the new MiB; chunk 25 (100-104M) holds 4 MiB of data.
    assert_eq!(bytes_read(&inc), 5 * MIB, "{}", stdout(&inc));
    assert!(stdout(&inc).contains("48 reused"), "{}", stdout(&inc));
    let inc = saved_id(&inc);
    assert_eq!(bitmap_flags(&img, "b0"), Some(vec!["auto".to_string()]));
    checks_clean(&img, false);
    restores_to_image(&repo, &inc, &img);

    // QEMU records into the bitmap strata stored: the next incremental reads
    // only the new change (chunk 30), not the ones before.
    qemu_io(&img, &["write -P 0x66 120M 512k"]);
    let inc2 = created(&repo, &img, &["--parent", "latest", "--bitmap", "b0"]);
    assert_eq!(bytes_read(&inc2), 512 << 10, "{}", stdout(&inc2));
    let inc2 = saved_id(&inc2);
    checks_clean(&img, false);
    restores_to_image(&repo, &inc2, &img);
    restic_check(&repo);
    strata_verify(&repo);

    // Nothing changed since: nothing is read.
    let idle = created(&repo, &img, &["--parent", "latest", "--bitmap", "b0"]);
    assert_eq!(bytes_read(&idle), 0, "{}", stdout(&idle));

    // A parent older than the snapshot the bitmap was cleared at lacks the
    // changes in between: everything is read, and said.
    let old = created(&repo, &img, &["--parent", &full, "--bitmap", "b0"]);
    assert!(
        stderr(&old).contains("reading the whole disk: the bitmap was cleared at snapshot"),
        "{}",
        stderr(&old)
    );
    assert_eq!(bytes_read(&old), allocated(&img));
    restores_to_image(&repo, &saved_id(&old), &img);
}

#[test]
fn a_bitmap_needs_a_parent_and_the_image_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, repo, _) = image_with_bitmap_and_full_backup(d);
    let before = snapshot_ids(&repo);
    let refused = |args: &[&str], needle: &str| {
        let out = create(&repo, &img, args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    };
    refused(&["--bitmap", "b0"], "needs a parent snapshot");
    refused(
        &["-U", "--parent", "latest", "--bitmap", "b0"],
        "cannot be used with force-share",
    );
    // A QEMU that has the image open for writing keeps strata out.
    let mut holder = qemu_holding(&img);
    refused(&["--parent", "latest", "--bitmap", "b0"], "lock");
    drop(holder.stdin.take());
    holder.wait().unwrap();
    assert_eq!(snapshot_ids(&repo), before);
    assert_eq!(bitmap_flags(&img, "b0"), Some(vec!["auto".to_string()]));
}

/// A QEMU (`qemu-io`, until its stdin closes) holding `image` open for
/// writing, once it has marked bitmap `b0` in use.
fn qemu_holding(image: &Path) -> std::process::Child {
    let child = Command::new("qemu-io")
        .args(["-f", "qcow2", s(image)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-io runs");
    wait_for_flag(image, "b0", "in-use");
    child
}

/// Wait until `qemu-img info` shows `flag` on bitmap `name` (QEMU marks its
/// bitmaps in use when it opens the image for writing).
fn wait_for_flag(image: &Path, name: &str, flag: &str) {
    let start = Instant::now();
    while !bitmap_flags(image, name).is_some_and(|f| f.iter().any(|x| x == flag)) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "bitmap {name} never showed {flag}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn unusable_bitmaps_mean_a_full_read_said_on_stderr_and_an_untouched_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, repo, _) = image_with_bitmap_and_full_backup(d);
    qemu_img(&["bitmap", "--add", "--disable", s(&img), "off"]);
    qemu_io(&img, &["write -P 0x77 60M 1M"]);
    let full_read = |name: &str, why: &str| {
        let before = std::fs::read(&img).unwrap();
        let out = created(&repo, &img, &["--parent", "latest", "--bitmap", name]);
        let err = stderr(&out);
        assert!(
            err.contains(&format!("reading the whole disk: {why}")),
            "{name}: {err}"
        );
        assert!(!stdout(&out).contains("cleared"), "{}", stdout(&out));
        assert_eq!(bytes_read(&out), allocated(&img), "{name}");
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{name}: the image changed"
        );
        restores_to_image(&repo, &saved_id(&out), &img);
    };
    full_read("nope", "the image has no persistent bitmap 'nope'");
    full_read("off", "bitmap 'off' is disabled");

    // Of another size than the disk: a table of two clusters for a bitmap of one.
    let sized = d.join("sized.qcow2");
    std::fs::copy(&img, &sized).unwrap();
    qemu_img(&["bitmap", "--remove", s(&sized), "off"]);
    common::damage::poke_bitmap_table_size(&sized, 2);
    let before = std::fs::read(&sized).unwrap();
    let out = created(&repo, &sized, &["--bitmap", "b0", "--parent", "latest"]);
    assert!(
        stderr(&out).contains("bitmap 'b0' is of another size than the 209715200-byte disk"),
        "{}",
        stderr(&out)
    );
    assert!(
        std::fs::read(&sized).unwrap() == before,
        "the image changed"
    );

    // In use: a QEMU killed while it had the image open left it inconsistent.
    let mut qemu = qemu_holding(&img);
    qemu.kill().unwrap();
    qemu.wait().unwrap();
    full_read("b0", "bitmap 'b0' is in use (inconsistent)");
    assert_eq!(
        bitmap_flags(&img, "b0"),
        Some(vec!["in-use".to_string(), "auto".to_string()])
    );
    checks_clean(&img, false);
    restic_check(&repo);
}

/// Kill rounds of the crash test (`STRATA_TEST_BITMAP_KILLS`).
fn kill_rounds() -> usize {
    std::env::var("STRATA_TEST_BITMAP_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

/// The snapshot files of the repository.
fn snapshot_files(repo: &Path) -> usize {
    std::fs::read_dir(repo.join("snapshots")).map_or(0, |d| d.count())
}

#[test]
fn a_strata_killed_between_snapshot_and_bitmap_clear_leaves_every_change_marked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, repo, _) = image_with_bitmap_and_full_backup(d);
    let (mut in_window, mut rounds) = (0, 0);
    for round in 0..kill_rounds() {
        rounds += 1;
        let at = (round as u64 * 13) % 190;
        qemu_io(
            &img,
            &[&format!("write -P {} {at}M 1M", 0x80 + round as u8)],
        );
        let snaps = snapshot_files(&repo);
        let mut a = vec!["create", "--repo", s(&repo)];
        a.extend(["--parent", "latest", "--bitmap", "b0", s(&img)]);
        let mut child = strata(&a)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill the moment the new snapshot file shows (the bitmap is cleared
        // right after), or, every third round, somewhere in the first 200 ms.
        let start = Instant::now();
        if round % 3 == 0 {
            std::thread::sleep(Duration::from_millis(round as u64 * 37 % 200));
        }
        while round % 3 != 0
            && snapshot_files(&repo) == snaps
            && start.elapsed() < Duration::from_secs(60)
            && child.try_wait().unwrap().is_none()
        {}
        let _ = child.kill();
        child.wait().unwrap();
        checks_clean(&img, true);
        assert_ne!(bitmap_flags(&img, "b0"), None, "round {round}: bitmap gone");
        // Does the bitmap still mark the round's change? An incremental tells.
        let next = created(&repo, &img, &["--parent", "latest", "--bitmap", "b0"]);
        if snapshot_files(&repo) == snaps + 2 && bytes_read(&next) > 0 {
            in_window += 1;
        }
        restores_to_image(&repo, &saved_id(&next), &img);
    }
    eprintln!("{rounds} kills, {in_window} between the snapshot and the bitmap clear");
    assert!(
        in_window > 0,
        "no kill fell between the snapshot and the clear"
    );
    // The killed backups' locks stay behind; restic's `unlock` removes them as stale.
    run(restic(&repo, &["unlock"]));
    restic_check(&repo);
    strata_verify(&repo);
}

#[test]
fn the_api_backs_up_through_a_bitmap_and_logs_why_it_reads_everything() {
    use common::api::{token, Server};
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (state, repo) = (d.join("state"), d.join("repo"));
    let tok = token(&state, false);
    let srv = Server::start_with_backups(&state, &repo);
    let (img, _) = image_with_bitmap_backed_up(d, &repo);
    qemu_io(&img, &["write -P 0x44 50M 1M"]);
    let backup = |bitmap: &str| {
        let body = json!({"image": s(&img), "parent": "latest", "bitmap": bitmap});
        let t = srv.follow(&tok, &srv.json("POST", "/api/v1/backups", &tok, &body));
        assert_eq!(t["state"], "ok", "{t}");
        t
    };
    let t = backup("b0");
    assert_eq!(t["result"]["bytes_read"], MIB, "{t}");
    assert_eq!(t["result"]["bitmap_cleared"], "b0", "{t}");
    assert_eq!(t["result"]["full_read"], serde_json::Value::Null, "{t}");
    let id = t["result"]["short_id"].as_str().unwrap().to_string();
    restores_to_image(&repo, &id, &img);
    let t = backup("nope");
    let why = "reading the whole disk: the image has no persistent bitmap 'nope'";
    assert!(t["log"].to_string().contains(why), "{t}");
    assert_eq!(t["result"]["bytes_read"], allocated(&img), "{t}");
    let body = json!({"image": s(&img), "bitmap": "b0"});
    let t = srv.follow(&tok, &srv.json("POST", "/api/v1/backups", &tok, &body));
    assert_eq!(t["state"], "error", "{t}");
    assert!(
        Server::last_log(&t).contains("needs a parent snapshot"),
        "{t}"
    );
}
