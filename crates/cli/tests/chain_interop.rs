//! Chain operations against the real qemu-img 10: the same chain (built by qemu-img
//! and qemu-io, qcow2 and raw layers) is committed, streamed and rebased by strata
//! in one directory and by qemu-img in another; the guest-visible content of every
//! image that stays valid must match (`qemu-img compare`), the backing pointers
//! must match, and every result must pass `qemu-img check`.

mod common;

use common::{io, ok, outcome, run};
use std::path::Path;
use std::process::{Command, Output};

/// base.raw <- l1.qcow2 <- l2.qcow2 <- l3.qcow2 <- top.qcow2, with overlapping
/// writes, zeroes, a grown layer and a shorter one.
fn chain(dir: &Path) {
    let q = |a: &[&str]| ok(dir, "qemu-img", a);
    q(&["create", "-q", "-f", "raw", "base.raw", "6M"]);
    io(
        dir,
        "raw",
        "base.raw",
        &["write -P 1 0 2M", "write -P 2 5M 512k"],
    );
    q(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "l1.qcow2", "6M",
    ]);
    io(
        dir,
        "qcow2",
        "l1.qcow2",
        &["write -P 3 1M 1M", "write -z 5M 64k"],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "l1.qcow2",
        "-F",
        "qcow2",
        "l2.qcow2",
        "8M",
    ]);
    io(
        dir,
        "qcow2",
        "l2.qcow2",
        &["write -P 4 1500k 300k", "write -P 5 7M 4k"],
    );
    q(&[
        "create", "-q", "-f", "qcow2", "-b", "l2.qcow2", "-F", "qcow2", "l3.qcow2", "8M",
    ]);
    io(
        dir,
        "qcow2",
        "l3.qcow2",
        &["write -z 0 128k", "write -P 6 3M 1M"],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "l3.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "8M",
    ]);
    io(
        dir,
        "qcow2",
        "top.qcow2",
        &["write -P 7 3500k 100k", "write -P 8 6M 64k"],
    );
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("strata"), t.path().join("qemu"));
    std::fs::create_dir_all(&a).unwrap();
    chain(&a);
    ok(
        t.path(),
        "cp",
        &["-r", a.to_str().unwrap(), b.to_str().unwrap()],
    );
    ok(
        &a,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "before.raw"],
    );
    (t, a, b)
}

fn backing_of(dir: &Path, img: &str) -> Option<String> {
    let info = ok(dir, "qemu-img", &["info", "-U", "--output=json", img]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["backing-filename"].as_str().map(String::from)
}

fn same_view(a: &Path, b: &Path, img: &str) {
    let o = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a.join(img))
        .arg(b.join(img))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{img}: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

fn all_check(dir: &Path) {
    for f in ["l1.qcow2", "l2.qcow2", "l3.qcow2", "top.qcow2"] {
        let o = run(dir, "qemu-img", &["check", "-U", f]);
        // Images left with a dangling backing file after a merge are not checked.
        if String::from_utf8_lossy(&o.stderr).contains("Could not open backing file") {
            continue;
        }
        assert!(
            o.status.success(),
            "{f}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn commit_matches_qemu_img() {
    for (args, still_valid) in [
        (&["commit", "top.qcow2"][..], &["top.qcow2", "l3.qcow2"][..]),
        (&["commit", "-d", "top.qcow2"], &["top.qcow2", "l3.qcow2"]),
        (
            &["commit", "-b", "l1.qcow2", "top.qcow2"],
            &["top.qcow2", "l1.qcow2"],
        ),
        (
            &["commit", "-b", "base.raw", "top.qcow2"],
            &["top.qcow2", "base.raw"],
        ),
        (
            &["commit", "-r", "64M", "top.qcow2"],
            &["top.qcow2", "l3.qcow2"],
        ),
        (
            &["commit", "-p", "l3.qcow2"],
            &["top.qcow2", "l3.qcow2", "l2.qcow2"],
        ),
    ] {
        let (_t, a, b) = setup();
        assert!(ok(&a, "strata", args).contains("Image committed."));
        ok(&b, "qemu-img", args);
        for img in still_valid {
            same_view(&a, &b, img);
        }
        ok(&a, "qemu-img", &["compare", "before.raw", "top.qcow2"]);
        all_check(&a);
        assert_eq!(
            backing_of(&a, "top.qcow2"),
            backing_of(&b, "top.qcow2"),
            "{args:?}"
        );
        // The top is left as qemu-img leaves it: emptied down to its header,
        // refcount structures and L1 table (or untouched with -d / -b).
        let len = |d: &Path| std::fs::metadata(d.join("top.qcow2")).unwrap().len();
        assert_eq!(len(&a), len(&b), "{args:?}: top.qcow2 file length");
        let mapped = |d: &Path| {
            let m = ok(d, "qemu-img", &["map", "--output=json", "-U", "top.qcow2"]);
            let v: serde_json::Value = serde_json::from_str(&m).unwrap();
            v.as_array()
                .unwrap()
                .iter()
                .filter(|e| e["depth"] == 0 && e["present"] == true)
                .map(|e| {
                    (
                        e["start"].as_u64(),
                        e["length"].as_u64(),
                        e["zero"].as_bool(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            mapped(&a),
            mapped(&b),
            "{args:?}: what the top itself stores"
        );
    }
}

#[test]
fn intermediate_commit_relinks_and_keeps_the_view() {
    let (_t, a, _b) = setup();
    ok(
        &a,
        "strata",
        &["commit", "--top", "l3.qcow2", "-b", "l1.qcow2", "top.qcow2"],
    );
    ok(&a, "qemu-img", &["compare", "before.raw", "top.qcow2"]);
    assert_eq!(backing_of(&a, "top.qcow2").as_deref(), Some("l1.qcow2"));
    let chain = ok(&a, "qemu-img", &["info", "--backing-chain", "top.qcow2"]);
    assert!(
        !chain.contains("l2.qcow2") && !chain.contains("l3.qcow2"),
        "{chain}"
    );
    all_check(&a);
}

#[test]
fn stream_pulls_the_chain_in_place() {
    let (_t, a, _b) = setup();
    ok(&a, "strata", &["stream", "-b", "l1.qcow2", "top.qcow2"]);
    ok(&a, "qemu-img", &["compare", "before.raw", "top.qcow2"]);
    assert_eq!(backing_of(&a, "top.qcow2").as_deref(), Some("l1.qcow2"));
    ok(&a, "qemu-img", &["check", "top.qcow2"]);
    ok(&a, "strata", &["stream", "-p", "top.qcow2"]);
    ok(&a, "qemu-img", &["compare", "before.raw", "top.qcow2"]);
    assert_eq!(backing_of(&a, "top.qcow2"), None);
    ok(&a, "qemu-img", &["check", "top.qcow2"]);
    // The reference flatten by qemu-img shows the same bytes.
    ok(
        &a,
        "qemu-img",
        &["convert", "-O", "qcow2", "before.raw", "ref.qcow2"],
    );
    ok(&a, "qemu-img", &["compare", "ref.qcow2", "top.qcow2"]);
}

#[test]
fn rebase_matches_qemu_img() {
    for args in [
        &["rebase", "-b", "l1.qcow2", "-F", "qcow2", "top.qcow2"][..],
        &["rebase", "-b", "base.raw", "-F", "raw", "top.qcow2"],
        &["rebase", "-b", "", "top.qcow2"],
        &["rebase", "-p", "-b", "l2.qcow2", "-F", "qcow2", "top.qcow2"],
        &["rebase", "-u", "-b", "l1.qcow2", "-F", "qcow2", "top.qcow2"],
    ] {
        let (_t, a, b) = setup();
        ok(&a, "strata", args);
        ok(&b, "qemu-img", args);
        same_view(&a, &b, "top.qcow2");
        if !args.contains(&"-u") {
            ok(&a, "qemu-img", &["compare", "before.raw", "top.qcow2"]);
        }
        assert_eq!(
            backing_of(&a, "top.qcow2"),
            backing_of(&b, "top.qcow2"),
            "{args:?}"
        );
        ok(&a, "qemu-img", &["check", "top.qcow2"]);
    }
}

#[test]
fn chain_inspection_and_flatten_read_the_whole_chain() {
    let (_t, a, _b) = setup();
    for out in ["--output=human", "--output=json"] {
        for args in [
            &["info", "--backing-chain", out, "top.qcow2"][..],
            &["map", out, "top.qcow2"],
        ] {
            let mut full = args.to_vec();
            full.push("-U");
            assert_eq!(
                ok(&a, "strata", args),
                ok(&a, "qemu-img", &full),
                "{args:?}"
            );
        }
    }
    ok(&a, "strata", &["compare", "before.raw", "top.qcow2"]);
    ok(
        &a,
        "strata",
        &["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"],
    );
    ok(&a, "qemu-img", &["compare", "before.raw", "flat.qcow2"]);
    assert_eq!(backing_of(&a, "flat.qcow2"), None);
    let m1 = ok(&a, "strata", &["measure", "-O", "qcow2", "top.qcow2"]);
    assert_eq!(
        m1,
        ok(&a, "qemu-img", &["measure", "-O", "qcow2", "top.qcow2"])
    );
}

#[test]
fn bad_chain_requests_fail_like_qemu_img() {
    let (_t, a, b) = setup();
    for args in [
        &["commit", "-b", "nonexist", "top.qcow2"][..],
        &["commit", "-b", "top.qcow2", "top.qcow2"],
        &["commit", "base.raw"],
        &["rebase", "-u", "-b", "l1.qcow2", "top.qcow2"],
        &["rebase", "-b", "nonexist", "-F", "qcow2", "top.qcow2"],
        &["rebase", "top.qcow2"],
        &["commit", "-r", "abc", "top.qcow2"],
        &["commit", "-r", "-5", "top.qcow2"],
    ] {
        let ours = run(&a, "strata", args);
        let theirs = run(&b, "qemu-img", args);
        assert_eq!(ours.status.code(), Some(1), "{args:?}");
        assert_eq!(theirs.status.code(), Some(1), "{args:?}");
        // The error is the last line (qemu-img may warn about probing first).
        let first = |o: &Output| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .replace("strata img", "PROG")
                .replace("qemu-img", "PROG")
        };
        assert_eq!(first(&ours), first(&theirs), "{args:?}");
    }
}

/// qemu-img commits into a base that another overlay also uses without a word
/// (the other overlay's content changes); a script parsing its output must see
/// the same from strata.
#[test]
fn commit_into_a_base_another_overlay_uses_prints_what_qemu_img_prints() {
    let (_t, a, b) = setup();
    let sibling = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "l3.qcow2",
        "-F",
        "qcow2",
        "sibling.qcow2",
    ];
    ok(&a, "qemu-img", &sibling);
    ok(&b, "qemu-img", &sibling);
    let ours = outcome(&a, "strata", &["commit", "top.qcow2"]);
    let theirs = outcome(&b, "qemu-img", &["commit", "top.qcow2"]);
    assert_eq!(theirs.0, Some(0), "{theirs:?}");
    assert_eq!(ours, theirs);
}

#[test]
fn stream_refuses_a_base_outside_the_chain_and_an_image_without_backing() {
    let (_t, a, _b) = setup();
    for (args, msg) in [
        (
            &["stream", "-b", "nonexist", "top.qcow2"][..],
            "Did not find 'nonexist'",
        ),
        (
            &["stream", "-b", "top.qcow2", "top.qcow2"],
            "Did not find 'top.qcow2'",
        ),
        (&["stream", "base.raw"], "does not have a backing file"),
        (
            &["commit", "--top", "nonexist", "top.qcow2"],
            "Did not find 'nonexist'",
        ),
    ] {
        let o = run(&a, "strata", args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
    // Nothing changed.
    ok(&a, "qemu-img", &["compare", "before.raw", "top.qcow2"]);
    assert_eq!(backing_of(&a, "top.qcow2").as_deref(), Some("l3.qcow2"));
}

#[test]
fn commit_empties_a_top_with_internal_snapshots_and_keeps_them() {
    let (_t, a, b) = setup();
    for d in [&a, &b] {
        ok(d, "qemu-img", &["snapshot", "-c", "s1", "top.qcow2"]);
        io(
            d,
            "qcow2",
            "top.qcow2",
            &["write -P 9 3500k 64k", "write -z 6M 4k"],
        );
        ok(
            d,
            "qemu-img",
            &["convert", "-O", "raw", "top.qcow2", "now.raw"],
        );
    }
    ok(
        &a,
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            "-l",
            "snapshot.name=s1",
            "top.qcow2",
            "s1.raw",
        ],
    );
    ok(&a, "strata", &["commit", "top.qcow2"]);
    ok(&b, "qemu-img", &["commit", "top.qcow2"]);
    // The guest view is kept, the base matches qemu-img's, the snapshot survives.
    ok(&a, "qemu-img", &["compare", "now.raw", "top.qcow2"]);
    same_view(&a, &b, "l3.qcow2");
    let o = run(&a, "qemu-img", &["check", "top.qcow2"]);
    assert!(
        matches!(o.status.code(), Some(0) | Some(3)),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(ok(&a, "qemu-img", &["snapshot", "-l", "top.qcow2"]).contains("s1"));
    ok(
        &a,
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            "-l",
            "snapshot.name=s1",
            "top.qcow2",
            "s1-after.raw",
        ],
    );
    ok(&a, "cmp", &["s1.raw", "s1-after.raw"]);
    // The top stores nothing of its own any more.
    let m = ok(&a, "qemu-img", &["map", "--output=json", "top.qcow2"]);
    let v: serde_json::Value = serde_json::from_str(&m).unwrap();
    assert!(v.as_array().unwrap().iter().all(|e| e["depth"] != 0), "{m}");
}

#[test]
fn rebase_onto_an_unrelated_image_copies_only_the_differences() {
    let (_t, a, b) = setup();
    for d in [&a, &b] {
        // Half equal to the old chain's content, half different, and shorter.
        ok(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=16k",
                "other.qcow2",
                "5M",
            ],
        );
        io(
            d,
            "qcow2",
            "other.qcow2",
            &[
                "write -P 1 0 1M",
                "write -P 3 1M 512k",
                "write -P 77 1536k 2M",
            ],
        );
    }
    let args = ["rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"];
    ok(&a, "strata", &args);
    ok(&b, "qemu-img", &args);
    ok(&a, "qemu-img", &["compare", "before.raw", "top.qcow2"]);
    same_view(&a, &b, "top.qcow2");
    ok(&a, "qemu-img", &["check", "top.qcow2"]);
    assert_eq!(backing_of(&a, "top.qcow2").as_deref(), Some("other.qcow2"));
    // What the top had to take in: about what qemu-img copied.
    let size = |d: &Path| std::fs::metadata(d.join("top.qcow2")).unwrap().len();
    assert!(
        size(&a) <= size(&b) + (1 << 20),
        "strata {} vs qemu-img {}",
        size(&a),
        size(&b)
    );
}
