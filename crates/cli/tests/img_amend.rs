//! `strata img amend` does what qemu-img amend does: on copies of the same images
//! (made by the real qemu-img/qemu-io 10), both tools print the same bytes
//! (stdout with `-p`, stderr, exit code), and the images they leave are clean for
//! `qemu-img check`, show the same `qemu-img info`, and hold the same guest data.

mod common;

use common::{assert_all_same, differs, outcome, same, same_image, same_on_copies, sh};
use std::path::Path;

/// The images amend is tried on, built in `dir`.
fn zoo(dir: &Path) {
    let q = |args: &[&str]| sh(dir, "qemu-img", args);
    let io = |f: &str, cmds: &[&str]| common::io(dir, "qcow2", f, cmds);
    // A new qcow2 image made with `-o opts` (none when empty).
    let create = |opts: &str, name: &str, size: &str| {
        let o: &[&str] = if opts.is_empty() { &[] } else { &["-o", opts] };
        q(&[&["create", "-q", "-f", "qcow2"][..], o, &[name, size]].concat());
    };
    create("", "plain.qcow2", "64M");
    io("plain.qcow2", &["write -P 1 0 1M", "write -z 2M 1M"]);
    create("", "snap.qcow2", "64M");
    io("snap.qcow2", &["write -P 1 0 1M", "write -z 2M 1M"]);
    q(&["snapshot", "-c", "s1", "snap.qcow2"]);
    io("snap.qcow2", &["write -z 0 64k", "write -P 3 4M 64k"]);
    create("compat=0.10", "v2.qcow2", "64M");
    io("v2.qcow2", &["write -P 1 0 1M"]);
    q(&["snapshot", "-c", "s1", "v2.qcow2"]);
    io("v2.qcow2", &["write -P 2 0 64k"]);
    create("", "base.qcow2", "64M");
    io("base.qcow2", &["write -P 7 0 8M"]);
    let overlay = ["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"];
    q(&[&["create", "-q", "-f", "qcow2"][..], &overlay[..]].concat());
    io(
        "top.qcow2",
        &["write -z 0 1M", "write -P 1 1M 64k", "write -z 1M 64k"],
    );
    q(&["snapshot", "-c", "s1", "top.qcow2"]);
    io("top.qcow2", &["write -z 4M 128k"]);
    create("refcount_bits=64", "r64.qcow2", "64M");
    io("r64.qcow2", &["write -P 5 0 256k"]);
    create("cluster_size=512", "small.qcow2", "8M");
    io("small.qcow2", &["write -P 6 0 2M"]);
    create("extended_l2=on", "ext.qcow2", "64M");
    create("compression_type=zstd", "zstd.qcow2", "64M");
    create("compression_type=zstd", "zstdc.qcow2", "64M");
    io("zstdc.qcow2", &["write -c -P 9 0 64k"]);
    create("lazy_refcounts=on", "lazy.qcow2", "64M");
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
    // Several steps at once, in qemu-img's order: the upgrade, the refcount
    // width, lazy refcounts, the size, the downgrade; a refused step leaves
    // those before it done.
    (
        "plain.qcow2",
        &["-p", "-o", "lazy_refcounts=on,refcount_bits=64,size=2G"],
    ),
    ("plain.qcow2", &["-p", "-o", "size=96M,refcount_bits=8"]),
    (
        "plain.qcow2",
        &[
            "-p",
            "-o",
            "compat=0.10,lazy_refcounts=on,refcount_bits=64,size=2G",
        ],
    ),
    (
        "plain.qcow2",
        &["-p", "-o", "refcount_bits=64,size=1073741825"],
    ),
    ("plain.qcow2", &["-p", "-o", "compat=0.10,size=128M"]),
    ("r64.qcow2", &["-p", "-o", "compat=0.10,size=128M"]),
    (
        "r64.qcow2",
        &["-p", "-o", "compat=0.10,refcount_bits=16,size=32M"],
    ),
    (
        "v2.qcow2",
        &[
            "-p",
            "-o",
            "compat=1.1,lazy_refcounts=on,refcount_bits=64,size=2G",
        ],
    ),
    ("v2.qcow2", &["-o", "lazy_refcounts=on,size=128M"]),
    (
        "lazy.qcow2",
        &["-p", "-o", "compat=0.10,lazy_refcounts=on,size=128M"],
    ),
    (
        "lazy.qcow2",
        &["-o", "refcount_bits=2,lazy_refcounts=off,size=32M"],
    ),
];

#[test]
fn amend_prints_and_leaves_what_qemu_img_amend_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    zoo(d);
    for (n, (img, args)) in CASES.iter().enumerate() {
        let what = format!("amend {args:?} {img}");
        let (ours, theirs) = same_on_copies(d, n, img, "amend", args, &[]);
        same_image(d, &ours, &theirs, &what);
        // The snapshot's view too, through raw copies.
        let (_, list, _) = outcome(d, "qemu-img", &["snapshot", "-l", &theirs]);
        if list.contains(" s1 ") {
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
                differs(format!("{what}: snapshot s1 differs"));
            }
        }
    }
    assert_all_same();
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
