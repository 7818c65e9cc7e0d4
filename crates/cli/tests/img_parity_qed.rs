//! The qed format through both tools: create (each option, backing files,
//! refusals), info (text, JSON, backing chains), map, check and repair,
//! compare, convert to and from qed, commit, rebase, resize, and the
//! commands QEMU's qed driver refuses (measure, amend, snapshots, bitmaps).
//! stdout, stderr and the exit code must be identical, and the files each
//! tool leaves alike.

mod common;

use common::{
    assert_all_same, copy_dir_sparse, differs, io, ok, outcome, same, same_in_dir_copies,
};
use std::path::Path;

fn put(dir: &Path, from: &str, to: &str, at: u64, bytes: &[u8]) {
    let mut data = std::fs::read(dir.join(from)).unwrap();
    let at = at as usize;
    if data.len() < at + bytes.len() {
        data.resize(at + bytes.len(), 0);
    }
    data[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(dir.join(to), data).unwrap();
}

/// qemu-img's images: `q.qed` (10 MiB: data over cluster and L2 bounds, a
/// zero write, clusters never written), `q.raw` and `q.qcow2` with the same
/// guest bytes, overlays `o.qed` over `base.raw` (format recorded) and
/// `p.qed` over `q.qcow2` (probed), `s.qed` with 4 KiB clusters, and damaged
/// copies of `q.qed`.
fn fixture(d: &Path) {
    let writes = [
        "write -P 0x17 1000 5000",
        "write -z 1M 64k",
        "write -P 9 3M 1M",
        "write -P 5 8388000 5000",
    ];
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qed", "q.qed", "10M"],
    );
    io(d, "qed", "q.qed", &writes);
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "q.raw", "10M"],
    );
    io(d, "raw", "q.raw", &writes);
    ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "q.raw", "q.qcow2"],
    );
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qed",
            "-o",
            "cluster_size=4k,table_size=2",
            "s.qed",
            "3M",
        ],
    );
    io(d, "qed", "s.qed", &["write -P 3 5000 70000"]);
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "8M"],
    );
    io(d, "raw", "base.raw", &["write -P 0x61 0 8M"]);
    ok(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", "o.qed",
        ],
    );
    io(
        d,
        "qed",
        "o.qed",
        &["write -P 0x62 100000 20000", "write -z 4M 64k"],
    );
    ok(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qed", "-b", "q.qcow2", "-F", "qcow2", "p.qed",
        ],
    );
    io(d, "qed", "p.qed", &["write -P 0x63 2M 4096"]);
    put(d, "q.qed", "magic.qed", 0, b"QEX");
    put(d, "q.qed", "features.qed", 16, &[0x20]);
    put(d, "q.qed", "cluster.qed", 4, &[0, 0x10, 0]);
    put(d, "q.qed", "table.qed", 8, &[5]);
    put(d, "q.qed", "l1.qed", 40, &[0, 0, 0x40, 0]);
    // q.qed's first data cluster is at 0x50000, its L2 table at 0x60000:
    // entry 0 now points past the file.
    put(d, "q.qed", "corrupt.qed", 0x60000, &[0, 0, 0, 0, 1]);
    let len = std::fs::metadata(d.join("q.qed")).unwrap().len();
    put(d, "q.qed", "leak.qed", len + 65535, &[0]);
    put(d, "q.qed", "dirty.qed", 16, &[2]);
}

fn fixture_dir(root: &Path) -> std::path::PathBuf {
    let fx = root.join("fx");
    std::fs::create_dir(&fx).unwrap();
    fixture(&fx);
    fx
}

#[test]
fn qed_images_are_inspected_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    for f in ["q.qed", "s.qed", "o.qed", "p.qed"] {
        for args in [
            vec!["info", f],
            vec!["info", "--output=json", f],
            vec!["info", "-f", "qed", f],
            vec!["info", "--backing-chain", f],
            vec!["info", "--backing-chain", "--output=json", f],
            vec!["map", f],
            vec!["map", "--output=json", f],
            vec!["check", f],
            vec!["check", "--output=json", f],
            vec!["compare", f, "q.raw"],
            vec!["compare", "-f", "qed", "-F", "raw", f, "q.raw"],
            vec!["measure", "-O", "qcow2", f],
            vec!["measure", "-O", "qed", f],
            vec!["snapshot", "-l", f],
        ] {
            same(d, &args);
        }
    }
    same(d, &["compare", "o.qed", "base.raw"]);
    same(d, &["compare", "p.qed", "q.qcow2"]);
    for f in [
        "magic.qed",
        "features.qed",
        "cluster.qed",
        "table.qed",
        "l1.qed",
        "corrupt.qed",
        "leak.qed",
        "dirty.qed",
    ] {
        same(d, &["info", f]);
        same(d, &["info", "-f", "qed", f]);
        same(d, &["check", "-f", "qed", f]);
        same(d, &["check", "-f", "qed", "--output=json", f]);
        same(d, &["map", "-f", "qed", "--output=json", f]);
    }
    assert_all_same();
}

#[test]
fn qed_images_are_created_and_refused_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture_dir(dir.path());
    let cases: &[&[&str]] = &[
        &["create", "-f", "qed", "n.qed", "5M"],
        &["create", "-f", "qed", "n.qed", "1000"],
        &["create", "-f", "qed", "n.qed", "0"],
        &["create", "-f", "qed", "-o", "size=7M", "n.qed"],
        &[
            "create",
            "-f",
            "qed",
            "-o",
            "cluster_size=4k",
            "n.qed",
            "5M",
        ],
        &[
            "create",
            "-f",
            "qed",
            "-o",
            "cluster_size=1M,table_size=16",
            "n.qed",
            "64M",
        ],
        &["create", "-f", "qed", "-o", "table_size=3", "n.qed", "5M"],
        &[
            "create",
            "-f",
            "qed",
            "-o",
            "cluster_size=1000",
            "n.qed",
            "5M",
        ],
        &[
            "create",
            "-f",
            "qed",
            "-o",
            "cluster_size=4k,table_size=1",
            "n.qed",
            "2G",
        ],
        &[
            "create",
            "-f",
            "qed",
            "-o",
            "preallocation=full",
            "n.qed",
            "5M",
        ],
        &[
            "create",
            "-f",
            "qed",
            "-o",
            "preallocation=metadata",
            "n.qed",
            "5M",
        ],
        &[
            "create",
            "-f",
            "qed",
            "-o",
            "preallocation=foo",
            "n.qed",
            "5M",
        ],
        &["create", "-f", "qed", "-o", "nocow=on", "n.qed", "5M"],
        &["create", "-f", "qed", "-o", "static=on", "n.qed", "5M"],
        &[
            "create", "-f", "qed", "-b", "base.raw", "-F", "raw", "n.qed",
        ],
        &[
            "create", "-f", "qed", "-b", "base.raw", "-F", "raw", "n.qed", "3M",
        ],
        &[
            "create", "-f", "qed", "-b", "q.qcow2", "-F", "qcow2", "n.qed",
        ],
        &["create", "-f", "qed", "-b", "q.qed", "-F", "qed", "n.qed"],
        &["create", "-f", "qed", "-b", "base.raw", "n.qed"],
        &[
            "create", "-f", "qed", "-b", "base.raw", "-F", "qcow2", "n.qed",
        ],
        &["create", "-f", "qed", "-b", "nosuch", "-F", "raw", "n.qed"],
        &[
            "create", "-f", "qcow2", "-b", "q.qed", "-F", "qed", "n.qcow2",
        ],
        &[
            "create", "-f", "qcow2", "-b", "q.raw", "-F", "qed", "n.qcow2",
        ],
        &["create", "-q", "-f", "qed", "n.qed", "64M"],
        &["resize", "q.qed", "20M"],
        &["resize", "-f", "qed", "q.qed", "+1M"],
        &["resize", "q.qed", "5M"],
        &["resize", "--shrink", "q.qed", "5M"],
        &["resize", "q.qed", "+1000"],
        &["resize", "o.qed", "12M"],
        &["amend", "-f", "qed", "-o", "cluster_size=4k", "q.qed"],
        &["snapshot", "-c", "snap", "q.qed"],
        &["check", "-r", "all", "corrupt.qed"],
        &["check", "-r", "leaks", "leak.qed"],
        &["check", "-r", "all", "dirty.qed"],
        &["check", "-r", "leaks", "q.qed"],
        &["rebase", "-u", "-b", "q.raw", "-F", "raw", "o.qed"],
        &["rebase", "-u", "-b", "", "o.qed"],
        &["rebase", "-u", "-b", "q.qcow2", "-F", "qcow2", "q.qed"],
        &["rebase", "-b", "q.raw", "-F", "raw", "o.qed"],
        &["rebase", "-b", "", "p.qed"],
        &["commit", "o.qed"],
        &["commit", "p.qed"],
    ];
    for (n, args) in cases.iter().enumerate() {
        same_in_dir_copies(&fx, n, args);
    }
    assert_all_same();
}

#[test]
fn qed_images_are_converted_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture_dir(dir.path());
    let cases: &[&[&str]] = &[
        &["convert", "-O", "qed", "q.raw", "n.qed"],
        &["convert", "-O", "qed", "q.qcow2", "n.qed"],
        &[
            "convert",
            "-O",
            "qed",
            "-o",
            "cluster_size=4k,table_size=2",
            "q.raw",
            "n.qed",
        ],
        &["convert", "-O", "qed", "q.qed", "n.qed"],
        &["convert", "-f", "qed", "-O", "raw", "q.qed", "n.raw"],
        &["convert", "-O", "qcow2", "q.qed", "n.qcow2"],
        &["convert", "-O", "raw", "o.qed", "n.raw"],
        &["convert", "-O", "qcow2", "p.qed", "n.qcow2"],
        &[
            "convert", "-O", "qed", "-B", "base.raw", "-F", "raw", "o.qed", "n.qed",
        ],
        &[
            "convert", "-O", "qed", "-B", "q.qcow2", "-F", "qcow2", "q.raw", "n.qed",
        ],
        &["convert", "-O", "qed", "-c", "q.raw", "n.qed"],
        &["convert", "-O", "qed", "magic.qed", "n.qed"],
    ];
    for (n, args) in cases.iter().enumerate() {
        same_in_dir_copies(&fx, n, args);
    }
    assert_all_same();
}

/// Images neither tool can open afterwards (QEMU cannot open the table-size-1
/// images its create makes; a backing file that is missing): the same output
/// and the very same bytes.
#[test]
fn qed_images_qemu_cannot_open_are_created_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture_dir(dir.path());
    let cases: &[&[&str]] = &[
        &["create", "-f", "qed", "-o", "table_size=1", "n.qed", "5M"],
        &[
            "create", "-f", "qed", "-u", "-b", "nosuch", "-F", "raw", "n.qed", "1M",
        ],
        &[
            "create", "-f", "qed", "-u", "-b", "nosuch", "-F", "qcow2", "n.qed", "1M",
        ],
        &["info", "n.qed"],
    ];
    for (n, args) in cases.iter().enumerate() {
        let (o, t) = (
            dir.path().join(format!("o{n}")),
            dir.path().join(format!("t{n}")),
        );
        copy_dir_sparse(&fx, &o);
        copy_dir_sparse(&fx, &t);
        if args[0] == "info" {
            for d in [&o, &t] {
                ok(
                    d,
                    "qemu-img",
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qed",
                        "-o",
                        "table_size=1",
                        "n.qed",
                        "1M",
                    ],
                );
            }
        }
        let (ro, rt) = (outcome(&o, "strata", args), outcome(&t, "qemu-img", args));
        if ro != rt {
            differs(format!(
                "`img {}`\n  strata:   {ro:?}\n  qemu-img: {rt:?}",
                args.join(" ")
            ));
        }
        if std::fs::read(o.join("n.qed")).ok() != std::fs::read(t.join("n.qed")).ok() {
            differs(format!("`img {}`: the images differ", args.join(" ")));
        }
    }
    assert_all_same();
}
