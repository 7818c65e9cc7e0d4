//! `strata img amend` does what qemu-img amend does: on copies of the same images
//! (made by the real qemu-img/qemu-io 10), both tools print the same bytes
//! (stdout with `-p`, stderr, exit code), and the images they leave are clean for
//! `qemu-img check`, show the same `qemu-img info`, and hold the same guest data.

mod common;

use common::{assert_all_same, outcome, same, sh};
use std::path::Path;

/// The images amend is tried on, built in `dir`.
fn zoo(dir: &Path) {
    let q = |args: &[&str]| sh(dir, "qemu-img", args);
    let io = |f: &str, cmds: &[&str]| common::io(dir, "qcow2", f, cmds);
    q(&["create", "-q", "-f", "qcow2", "plain.qcow2", "64M"]);
    io("plain.qcow2", &["write -P 1 0 1M", "write -z 2M 1M"]);
    q(&["create", "-q", "-f", "qcow2", "snap.qcow2", "64M"]);
    io("snap.qcow2", &["write -P 1 0 1M", "write -z 2M 1M"]);
    q(&["snapshot", "-c", "s1", "snap.qcow2"]);
    io("snap.qcow2", &["write -z 0 64k", "write -P 3 4M 64k"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "64M",
    ]);
    io("v2.qcow2", &["write -P 1 0 1M"]);
    q(&["snapshot", "-c", "s1", "v2.qcow2"]);
    io("v2.qcow2", &["write -P 2 0 64k"]);
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    io("base.qcow2", &["write -P 7 0 8M"]);
    let overlay = ["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"];
    q(&[&["create", "-q", "-f", "qcow2"][..], &overlay[..]].concat());
    io(
        "top.qcow2",
        &["write -z 0 1M", "write -P 1 1M 64k", "write -z 1M 64k"],
    );
    q(&["snapshot", "-c", "s1", "top.qcow2"]);
    io("top.qcow2", &["write -z 4M 128k"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=64",
        "r64.qcow2",
        "64M",
    ]);
    io("r64.qcow2", &["write -P 5 0 256k"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "small.qcow2",
        "8M",
    ]);
    io("small.qcow2", &["write -P 6 0 2M"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "ext.qcow2",
        "64M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "zstd.qcow2",
        "64M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "zstdc.qcow2",
        "64M",
    ]);
    io("zstdc.qcow2", &["write -c -P 9 0 64k"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "lazy.qcow2",
        "64M",
    ]);
    io("lazy.qcow2", &["write -P 4 0 128k"]);
}

/// Each case: the image, then amend's arguments (the image name is appended).
const CASES: &[(&str, &[&str])] = &[
    ("plain.qcow2", &["-p", "-o", "compat=0.10"]),
    ("plain.qcow2", &["-o", "compat=v2"]),
    ("plain.qcow2", &["-p", "-o", "refcount_bits=1"]),
    ("plain.qcow2", &["-p", "-o", "refcount_bits=8"]),
    ("plain.qcow2", &["-p", "-o", "refcount_bits=64"]),
    ("plain.qcow2", &["-p", "-o", "lazy_refcounts=on"]),
    ("plain.qcow2", &["-o", "compat=0.10,refcount_bits=16"]),
    ("plain.qcow2", &["-o", "size=32M"]),
    ("plain.qcow2", &["-o", "size=128M"]),
    ("plain.qcow2", &["-q", "-p", "-o", "compat=0.10"]),
    // qemu-img takes the last of an option given twice.
    ("plain.qcow2", &["-o", "compat=0.10", "-o", "compat=1.1"]),
    (
        "plain.qcow2",
        &["-f", "raw", "-f", "qcow2", "-o", "compat=0.10"],
    ),
    ("snap.qcow2", &["-p", "-o", "compat=0.10"]),
    ("snap.qcow2", &["-p", "-o", "refcount_bits=2"]),
    ("snap.qcow2", &["-o", "refcount_bits=1"]),
    (
        "snap.qcow2",
        &["-p", "-o", "compat=0.10,lazy_refcounts=off"],
    ),
    ("v2.qcow2", &["-p", "-o", "compat=1.1"]),
    (
        "v2.qcow2",
        &["-p", "-o", "compat=1.1,refcount_bits=8,lazy_refcounts=on"],
    ),
    ("v2.qcow2", &["-o", "refcount_bits=8"]),
    ("v2.qcow2", &["-o", "lazy_refcounts=on"]),
    ("top.qcow2", &["-p", "-o", "compat=0.10"]),
    (
        "top.qcow2",
        &["-o", "backing_file=base.qcow2,backing_fmt=qcow2"],
    ),
    ("top.qcow2", &["-o", "backing_file=base.qcow2"]),
    ("top.qcow2", &["-o", "backing_fmt=raw"]),
    ("r64.qcow2", &["-p", "-o", "compat=0.10"]),
    ("r64.qcow2", &["-p", "-o", "compat=0.10,refcount_bits=16"]),
    ("small.qcow2", &["-p", "-o", "refcount_bits=64"]),
    ("small.qcow2", &["-p", "-o", "refcount_bits=4"]),
    ("ext.qcow2", &["-o", "compat=0.10"]),
    ("zstd.qcow2", &["-o", "compat=0.10"]),
    ("zstdc.qcow2", &["-o", "compat=0.10"]),
    ("lazy.qcow2", &["-p", "-o", "lazy_refcounts=off"]),
    ("lazy.qcow2", &["-o", "compat=0.10"]),
];

/// `qemu-img info --output=json` of `file`, without what names or measures the
/// file itself (the two copies have different names, and QEMU punches holes
/// where strata leaves zeroes).
fn info(dir: &Path, file: &str) -> String {
    let (_, out, err) = outcome(dir, "qemu-img", &["info", "--output=json", file]);
    (out + &err)
        .lines()
        .filter(|l| !l.contains("actual-size") && !l.contains("\"filename\""))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(file, "IMG")
}

#[test]
fn amend_prints_and_leaves_what_qemu_img_amend_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    zoo(d);
    let mut failures = Vec::new();
    for (n, (img, args)) in CASES.iter().enumerate() {
        let ours = format!("o{n}-{img}");
        let theirs = format!("t{n}-{img}");
        std::fs::copy(d.join(img), d.join(&ours)).unwrap();
        std::fs::copy(d.join(img), d.join(&theirs)).unwrap();
        let run = |prog: &str, f: &str| {
            let mut a = vec!["amend"];
            a.extend_from_slice(args);
            a.push(f);
            let (code, out, err) = outcome(d, prog, &a);
            (code, out.replace(f, "IMG"), err.replace(f, "IMG"))
        };
        let what = format!("amend {args:?} {img}");
        let r_ours = run("strata", &ours);
        let r_theirs = run("qemu-img", &theirs);
        if r_ours != r_theirs {
            failures.push(format!(
                "{what}\n  strata:   {r_ours:?}\n  qemu-img: {r_theirs:?}"
            ));
        }
        let (i_ours, i_theirs) = (info(d, &ours), info(d, &theirs));
        if i_ours != i_theirs {
            failures.push(format!("{what}: info\n{i_ours}\n---\n{i_theirs}"));
        }
        let (code, out, err) = outcome(d, "qemu-img", &["check", &ours]);
        if code != Some(0) {
            failures.push(format!("{what}: check {code:?}\n{out}{err}"));
        }
        let (code, out, err) = outcome(d, "qemu-img", &["compare", &ours, &theirs]);
        if code != Some(0) {
            failures.push(format!("{what}: compare\n{out}{err}"));
        }
        // The snapshot's view too, through raw copies.
        if i_theirs.contains("\"s1\"") {
            let raw = |f: &str| {
                let out = format!("{f}.s1.raw");
                let a = [
                    "convert",
                    "-U",
                    "-l",
                    "snapshot.name=s1",
                    "-O",
                    "raw",
                    f,
                    &out,
                ];
                sh(d, "qemu-img", &a);
                std::fs::read(d.join(out)).unwrap()
            };
            if raw(&ours) != raw(&theirs) {
                failures.push(format!("{what}: snapshot s1 differs"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn amend_refusals_are_worded_as_qemu_img_words_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
    );
    sh(d, "qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let cases: &[&[&str]] = &[
        &["amend", "a.qcow2"],
        &["amend", "-o", "compat=1.1"],
        &["amend", "-o", "help"],
        &["amend", "-o", "compat=1.1", "a.qcow2", "b.qcow2"],
        &["amend", "-U", "-o", "compat=1.1", "a.qcow2"],
        &["amend", "-o", "foo=1,cluster_size=4k", "a.qcow2"],
        &["amend", "-o", "cluster_size=4k", "a.qcow2"],
        &["amend", "-o", "preallocation=full", "a.qcow2"],
        &["amend", "-o", "compat=2", "a.qcow2"],
        &["amend", "-o", "lazy_refcounts=maybe", "a.qcow2"],
        &["amend", "-o", "refcount_bits=abc", "a.qcow2"],
        &["amend", "-o", "refcount_bits=3", "a.qcow2"],
        &["amend", "-o", "refcount_bits=128", "a.qcow2"],
        &["amend", "-o", "refcount_bits=0", "a.qcow2"],
        &["amend", "-o", "size=abc", "a.qcow2"],
        &["amend", "-o", "compat=0.10,refcount_bits=8", "a.qcow2"],
        &["amend", "-o", "compat=0.10,lazy_refcounts=on", "a.qcow2"],
        &["amend", "-o", "compat=1.1", "missing.qcow2"],
        &["amend", "-o", "compat=1.1", "r.raw"],
        &["amend", "-f", "raw", "-o", "compat=1.1", "r.raw"],
        &["amend", "-f", "raw", "-o", "help", "r.raw"],
    ];
    for args in cases {
        same(d, args);
    }
    assert_all_same();
}
