//! `strata backup` on S3-compatible object storage, against a real Garage cluster
//! on loopback and the real `restic` (missing binaries fail the tests): restic
//! lists, checks and restores what strata stores in a bucket and the reverse; a
//! three-node cluster with three replicas loses a node in the middle of a backup,
//! the backup still completes, checks and restores through either survivor, and
//! an incremental goes through the node once it is back; unreachable servers, refused
//! credentials and missing buckets are clear errors.

mod common;

use common::garage::Garage;
use common::restic::{noise, reads_clean, restic, run, saved_id, snapshots_json, strata, MIB};
use std::path::Path;
use std::process::Command;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw disk of `mib` MiB: noise, a zero run, compressible text, noise.
fn raw_disk(path: &Path, mib: usize) -> Vec<u8> {
    let mut d = noise(mib / 4 * MIB);
    d.resize(mib / 2 * MIB, 0);
    d.extend(b"strata on s3 ".iter().cycle().take(mib / 4 * MIB));
    d.extend(noise(mib * MIB - d.len()));
    std::fs::write(path, &d).unwrap();
    d
}

/// `cmd` with the cluster's credentials.
fn on(g: &Garage, mut cmd: Command) -> Command {
    g.credentials(&mut cmd);
    cmd
}

#[test]
fn restic_checks_and_restores_what_strata_stores_in_garage_and_the_reverse() {
    let g = Garage::start(1);
    let d = g.dir().to_path_buf();
    let repo = g.repo(0, "vm1/disks");
    let disk = d.join("disk.raw");
    let mut want = raw_disk(&disk, 24);

    run(on(&g, strata(&["init", "--repo", &repo])));
    let first = saved_id(&run(on(&g, strata(&["create", "--repo", &repo, s(&disk)]))));
    // An incremental on top: one changed MiB.
    want[5 * MIB..6 * MIB].fill(0x6b);
    std::fs::write(&disk, &want).unwrap();
    let second = saved_id(&run(on(
        &g,
        strata(&["create", "--repo", &repo, "--parent", &first, s(&disk)]),
    )));

    let listed = snapshots_json(&run(on(&g, restic(&repo, &["snapshots", "--json"]))));
    let ids: Vec<_> = listed
        .iter()
        .map(|s| s["short_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [first.as_str(), second.as_str()]);
    reads_clean(on(&g, restic(&repo, &["check", "--read-data"])));

    let target = d.join("restic-out");
    run(on(
        &g,
        restic(&repo, &["restore", &second, "--target", s(&target)]),
    ));
    assert!(std::fs::read(target.join("disk.raw")).unwrap() == want);
    let out = d.join("out.raw");
    run(on(
        &g,
        strata(&["restore", "--repo", &repo, &second, s(&out)]),
    ));
    assert!(
        std::fs::read(&out).unwrap() == want,
        "strata's restore differs"
    );

    // restic writes into the bucket strata set up, and strata restores it.
    run(on(
        &g,
        restic(
            &repo,
            &["backup", "--stdin", "--stdin-filename", "again.raw"],
        ),
    )
    .stdin(std::fs::File::open(&disk).unwrap()));
    let listed = snapshots_json(&run(on(
        &g,
        strata(&["list", "--repo", &repo, "--output=json"]),
    )));
    let theirs = listed
        .iter()
        .find(|s| s["paths"][0] == "/again.raw")
        .unwrap();
    let out = d.join("again.raw");
    let id = theirs["short_id"].as_str().unwrap();
    run(on(&g, strata(&["restore", "--repo", &repo, id, s(&out)])));
    assert!(
        std::fs::read(&out).unwrap() == want,
        "restic's backup restores differently"
    );
}

/// Node 2 is killed once it stores this much of the backup's data.
const KILL_AFTER: u64 = 4 * MIB as u64;

#[test]
fn a_three_replica_cluster_that_loses_a_node_during_a_backup_completes_it() {
    let mut g = Garage::start(3);
    let d = g.dir().to_path_buf();
    // Served by node 0; node 2 is killed while the backup runs.
    let repo = g.repo(0, "replicated");
    run(on(&g, strata(&["init", "--repo", &repo])));
    let disk = d.join("disk.raw");
    let mut want = raw_disk(&disk, 96);
    let before = g.stored_bytes(2);
    let mut child = on(&g, strata(&["create", "--repo", &repo, s(&disk)]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The kill lands once node 2 holds the first few MiB of the backup, with
    // most of the disk's ~48 MiB of stored data still to come.
    let start = std::time::Instant::now();
    while g.stored_bytes(2) < before + KILL_AFTER {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup finished before node 2 stored {KILL_AFTER} bytes of it"
        );
        assert!(
            start.elapsed().as_secs() < 120,
            "the backup made no progress"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    g.kill_node(2);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup ended before node 2 was killed"
    );
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the backup failed after a node was lost: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let first = saved_id(&out);

    // Two nodes of three hold a quorum: the repository reads back whole through
    // each survivor.
    for node in [0, 1] {
        reads_clean(on(
            &g,
            restic(g.repo(node, "replicated"), &["check", "--read-data"]),
        ));
    }
    let out = d.join("out.raw");
    let via_node1 = g.repo(1, "replicated");
    run(on(
        &g,
        strata(&["restore", "--repo", &via_node1, &first, s(&out)]),
    ));
    assert!(std::fs::read(&out).unwrap() == want, "the restore differs");

    // The node comes back and an incremental goes through it.
    g.restart_node(2);
    want[10 * MIB..11 * MIB].fill(0x5a);
    std::fs::write(&disk, &want).unwrap();
    let via_node2 = g.repo(2, "replicated");
    let second = saved_id(&run(on(
        &g,
        strata(&["create", "--repo", &via_node2, "--parent", &first, s(&disk)]),
    )));
    run(on(
        &g,
        strata(&["restore", "--repo", &via_node2, &second, s(&out)]),
    ));
    assert!(
        std::fs::read(&out).unwrap() == want,
        "the incremental restores differently"
    );
}

/// Run `cmd`, require failure with exit 1, and return its stderr.
fn fails(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{cmd:?}: {err}");
    err
}

#[test]
fn unreachable_servers_refused_keys_and_missing_buckets_are_clear_errors() {
    let g = Garage::start(1);
    let repo = g.repo(0, "errors");

    // Nothing listens on the port.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = fails(on(
        &g,
        strata(&["init", "--repo", &format!("s3:http://127.0.0.1:{gone}/b")]),
    ));
    assert!(err.contains(&format!("127.0.0.1:{gone}")), "{err}");

    // A key the server does not know.
    let mut bad_key = strata(&["init", "--repo", &repo]);
    g.credentials(&mut bad_key)
        .env("AWS_SECRET_ACCESS_KEY", "0".repeat(64));
    let err = fails(bad_key);
    assert!(err.contains("could not") && err.contains("errors"), "{err}");

    // A bucket that does not exist.
    let missing = repo.replace("/strata/", "/no-such-bucket/");
    let err = fails(on(&g, strata(&["init", "--repo", &missing])));
    assert!(err.contains("no-such-bucket"), "{err}");

    // None of that left a repository behind; a real init works, a second is refused.
    let probe = on(&g, restic(&repo, &["cat", "config"])).output().unwrap();
    assert!(
        !probe.status.success(),
        "a failed init left a config behind"
    );
    run(on(&g, strata(&["init", "--repo", &repo])));
    let err = fails(on(&g, strata(&["init", "--repo", &repo])));
    assert!(err.contains("already exists"), "{err}");
    run(on(&g, restic(&repo, &["cat", "config"])));
}
