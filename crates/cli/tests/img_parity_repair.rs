//! `check -r` repairs as qemu-img repairs: on images damaged in known ways (a
//! referenced cluster with refcount 0, a refcount block named twice, a leaked
//! cluster; one and several refcount blocks; with a snapshot) both tools print
//! the same lines and exit codes, and leave byte-identical files with the same
//! disk usage. Where a rebuild of the refcount structure is needed, `-r leaks`
//! gives up as qemu-img does, and `-r all` rebuilds it where qemu-img puts it.

mod common;

use common::damage::{first_l2_cluster, poke_refcount, poke_reftable, reftable_entry};
use common::{assert_all_same, differs, io, outcome, same_on_copies, sh};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The damaged images, made by qemu-img and qemu-io in `d`.
fn damaged(d: &Path) -> Vec<&'static str> {
    let create = |name: &str, opts: &str, size: &str| {
        sh(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, name, size],
        );
    };
    // A data cluster nothing else uses, with refcount 0.
    create("low.qcow2", "cluster_size=65536", "4M");
    io(d, "qcow2", "low.qcow2", &["write -P 1 0 1M"]);
    poke_refcount(&d.join("low.qcow2"), 5, 0);
    // An L2 table with refcount 0, in an image of 512-byte clusters whose
    // refcounts span several refcount blocks.
    create("l2low.qcow2", "cluster_size=512", "8M");
    io(
        d,
        "qcow2",
        "l2low.qcow2",
        &["write -P 2 0 300k", "write -P 3 4M 100k"],
    );
    let l2 = first_l2_cluster(&d.join("l2low.qcow2"));
    poke_refcount(&d.join("l2low.qcow2"), l2, 0);
    // With a snapshot: a cluster written after it, refcount 0.
    create("snaplow.qcow2", "cluster_size=65536", "8M");
    io(d, "qcow2", "snaplow.qcow2", &["write -P 1 0 1M"]);
    sh(d, "qemu-img", &["snapshot", "-c", "s1", "snaplow.qcow2"]);
    io(d, "qcow2", "snaplow.qcow2", &["write -P 5 64k 128k"]);
    std::fs::copy(d.join("snaplow.qcow2"), d.join("shared.qcow2")).unwrap();
    std::fs::copy(d.join("snaplow.qcow2"), d.join("leak.qcow2")).unwrap();
    poke_refcount(&d.join("snaplow.qcow2"), 25, 0);
    // The refcount table names one refcount block twice.
    let first = reftable_entry(&d.join("shared.qcow2"), 0);
    poke_reftable(&d.join("shared.qcow2"), 1, first);
    // Two clusters past the data, counted as used by nothing.
    let len = std::fs::metadata(d.join("leak.qcow2")).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("leak.qcow2"))
        .unwrap();
    f.set_len(len + 2 * 65536).unwrap();
    poke_refcount(&d.join("leak.qcow2"), len / 65536, 1);
    poke_refcount(&d.join("leak.qcow2"), len / 65536 + 1, 2);
    vec![
        "low.qcow2",
        "l2low.qcow2",
        "snaplow.qcow2",
        "shared.qcow2",
        "leak.qcow2",
    ]
}

#[test]
fn check_repairs_print_and_leave_what_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut n = 0;
    for img in damaged(d) {
        for mode in ["leaks", "all"] {
            n += 1;
            let (ours, theirs) = same_on_copies(d, n, img, "check", &["-r", mode], &[]);
            let what = format!("check -r {mode} {img}");
            let bytes = |f: &str| std::fs::read(d.join(f)).unwrap();
            if bytes(&ours) != bytes(&theirs) {
                differs(format!("{what}: the files differ"));
            }
            let blocks = |f: &str| std::fs::metadata(d.join(f)).unwrap().blocks();
            if blocks(&ours) != blocks(&theirs) {
                differs(format!(
                    "{what}: disk usage {} blocks, qemu-img's {}",
                    blocks(&ours),
                    blocks(&theirs)
                ));
            }
            if mode == "all" {
                let (code, out, err) = outcome(d, "qemu-img", &["check", &ours]);
                if code != Some(0) {
                    differs(format!("{what}: left unclean {code:?}\n{out}{err}"));
                }
            }
        }
    }
    assert_all_same();
}
