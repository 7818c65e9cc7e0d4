//! Faults in the repository's upkeep, looped: prune and gc killed at random
//! points leave a repository `restic check --read-data` and `strata backup verify`
//! pass, in which every snapshot still listed restores to the bytes its backup
//! read; and gc running while backups run loses nothing a finished backup
//! references. Loop counts come from environment variables with CI-sized
//! defaults.

mod common;

use common::restic::*;
use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A small xorshift generator seeded from the clock (the seed is printed).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        eprintln!("seed {seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

const CHUNK: usize = 4 * MIB;

/// The repository's files (locks left out), for seeing whether a run changed it.
fn files(repo: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![repo.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if !p.starts_with(repo.join("locks")) {
                out.push(p.display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Rewrite two random 4 MiB chunks of `content` with new noise and back it up
/// (waiting for locks); the snapshot's full ID and its bytes.
fn change_and_back_up(
    repo: &Path,
    disk: &Path,
    content: &mut [u8],
    rng: &mut Rng,
) -> (String, Vec<u8>) {
    let chunks = content.len() / CHUNK;
    for _ in 0..2 {
        let c = rng.below(chunks as u64) as usize;
        content[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&noise(CHUNK));
    }
    std::fs::write(disk, &*content).unwrap();
    let out = run(strata(&[
        "create",
        "--repo",
        s(repo),
        "--retry-lock",
        "300",
        s(disk),
    ]));
    (full_id(repo, &saved_id(&out)), content.to_vec())
}

#[test]
fn prune_and_gc_killed_at_random_points_leave_a_sound_repository() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let disk = d.join("disk.raw");
    run(strata(&["init", "--repo", s(&repo)]));
    let mut rng = Rng::new();
    let mut content = noise(6 * CHUNK);
    let mut made = HashMap::new();
    for _ in 0..2 {
        let (id, bytes) = change_and_back_up(&repo, &disk, &mut content, &mut rng);
        made.insert(id, bytes);
    }
    let (mut killed, mut mid_work, mut finished) = (0, 0, 0);
    // The rounds asked for, and more (up to four times as many) while no kill has
    // yet landed after the repository started changing: a fast prune changes files
    // only near its end, which a uniformly drawn kill time can miss several times.
    let rounds = env_count("STRATA_BACKUP_MAINT_KILL_ROUNDS", 6);
    let mut round = 0;
    while round < rounds || (mid_work == 0 && round < rounds * 4) {
        round += 1;
        let (id, bytes) = change_and_back_up(&repo, &disk, &mut content, &mut rng);
        made.insert(id, bytes);
        let prune = round % 2 == 0;
        if !prune {
            // restic forgets the oldest (strata lists oldest first), strata's gc collects.
            let listed =
                snapshots_json(&run(strata(&["list", "--repo", s(&repo), "--output=json"])));
            run(restic(
                &repo,
                &["forget", listed[0]["id"].as_str().unwrap()],
            ));
        }
        let op = |r: &Path| -> std::process::Command {
            let args = if prune {
                vec!["prune", "--repo", s(r), "--keep-last", "2"]
            } else {
                vec!["gc", "--repo", s(r)]
            };
            let mut c = strata(&args);
            c.stdout(Stdio::null()).stderr(Stdio::null());
            c
        };
        // Time the same run, uncut, on a copy: the kill lands anywhere in it.
        let copy = d.join("timing-copy");
        run(std::process::Command::new("cp").args(["-a", s(&repo), s(&copy)]));
        let start = Instant::now();
        run(op(&copy));
        let took = start.elapsed();
        std::fs::remove_dir_all(&copy).unwrap();
        let before = files(&repo);
        let mut child = op(&repo).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(
            rng.below(took.as_millis() as u64 + 1),
        ));
        // SAFETY: the child is ours and has not been waited for.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        if child.wait().unwrap().success() {
            finished += 1;
        } else {
            killed += 1;
            if files(&repo) != before {
                mid_work += 1;
            }
        }
        // The killed process's lock is stale (same host, dead process).
        run(restic(&repo, &["unlock"]));
        restic_check(&repo);
        strata_verify(&repo);
        made.retain(|id, _| snapshot_ids(&repo).contains(id));
        all_restore(&repo, &made);
        assert!(!made.is_empty(), "round {round}: every snapshot is gone");
    }
    eprintln!(
        "{killed} prune/gc runs killed ({mid_work} after changing the repository), {finished} finished first"
    );
    assert!(
        mid_work > 0,
        "no kill landed while the repository was changing: the loop proved nothing"
    );
    // After the kills, a whole gc cleans up and the repository stays sound.
    run(strata(&["gc", "--repo", s(&repo)]));
    let again = run(strata(&[
        "gc",
        "--repo",
        s(&repo),
        "--dry-run",
        "--output=json",
    ]));
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["blobs_removed"], 0, "{again}");
    assert_eq!(again["unindexed_packs_removed"], 0, "{again}");
    restic_check(&repo);
    all_restore(&repo, &made);
}

#[test]
fn gc_running_while_backups_run_loses_nothing_a_finished_backup_references() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let disk = d.join("disk.raw");
    run(strata(&["init", "--repo", s(&repo)]));
    let stop = AtomicBool::new(false);
    let collections = AtomicU64::new(0);
    let mut made = HashMap::new();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                run(strata(&[
                    "prune",
                    "--repo",
                    s(&repo),
                    "--keep-last",
                    "3",
                    "--retry-lock",
                    "300",
                ]));
                collections.fetch_add(1, Ordering::Relaxed);
            }
        });
        let mut rng = Rng::new();
        let mut content = noise(6 * CHUNK);
        for _ in 0..env_count("STRATA_BACKUP_GC_RACE_ROUNDS", 8) {
            let (id, bytes) = change_and_back_up(&repo, &disk, &mut content, &mut rng);
            made.insert(id, bytes);
        }
        stop.store(true, Ordering::Relaxed);
    });
    let runs = collections.load(Ordering::Relaxed);
    eprintln!("{runs} prunes ran alongside {} backups", made.len());
    assert!(
        runs >= 2,
        "prune ran {runs} times: the backups did not race it"
    );
    let listed = snapshot_ids(&repo);
    assert_eq!(listed.len(), 3, "keep-last 3 keeps three");
    made.retain(|id, _| listed.contains(id));
    assert_eq!(made.len(), 3);
    restic_check(&repo);
    strata_verify(&repo);
    all_restore(&repo, &made);
}
