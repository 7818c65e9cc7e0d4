//! Images holding persistent dirty bitmaps, changed by commands that open them
//! for writing: qemu-img stores every consistent bitmap anew when it closes
//! such an image (new data clusters, tables and directory, the old ones freed),
//! after marking the old directory in use where it lies. Both tools run the
//! same command on copies of the same image; the copies must then print the
//! same `info` and `check` (file length and image end offset included) and,
//! where the layout is pinned, be the same bytes.

mod common;

use common::{assert_all_same, differs, io, qcow2, qemu_views, same_bytes, same_on_copies, sh};
use std::path::Path;

/// The copies left by [`same_on_copies`] look the same to QEMU and, when
/// `bytes`, are the same bytes.
fn alike(dir: &Path, (ours, theirs): (String, String), what: &str, bytes: bool) {
    let (v_ours, v_theirs) = (qemu_views(dir, &ours), qemu_views(dir, &theirs));
    if v_ours != v_theirs {
        differs(format!("{what}: views\n{v_ours}\n---\n{v_theirs}"));
    }
    if bytes {
        same_bytes(dir, &ours, &theirs, what);
    }
}

/// A 64 MiB image with three bitmaps added by qemu-img (`b0` enabled at 64 KiB,
/// `b1` enabled at 128 KiB, `b2` disabled), then guest data written by
/// qemu-io (so the enabled ones hold dirty bits), and an internal snapshot
/// `s0` taken between two writes when `snapshot`.
fn three_bitmaps(dir: &Path, name: &str, snapshot: bool) {
    qcow2(dir, name, "64M", &[]);
    sh(dir, "qemu-img", &["bitmap", "--add", name, "b0"]);
    sh(
        dir,
        "qemu-img",
        &["bitmap", "--add", "-g", "128K", name, "b1"],
    );
    sh(
        dir,
        "qemu-img",
        &["bitmap", "--add", "--disable", name, "b2"],
    );
    io(
        dir,
        "qcow2",
        name,
        &["write -P 1 0 1M", "write -P 2 10M 64k"],
    );
    if snapshot {
        sh(dir, "qemu-img", &["snapshot", "-c", "s0", name]);
        io(dir, "qcow2", name, &["write -P 3 20M 128k"]);
    }
}

/// One bitmap at 512-byte granularity on an image of 4 KiB clusters, with
/// dirty bits in more than one bitmap-data cluster.
fn fine_bitmap(dir: &Path, name: &str) {
    qcow2(dir, name, "32M", &["-o", "cluster_size=4096"]);
    sh(
        dir,
        "qemu-img",
        &["bitmap", "--add", "-g", "512", name, "fine"],
    );
    io(
        dir,
        "qcow2",
        name,
        &["write -P 5 0 4k", "write -P 6 17M 8k"],
    );
}

#[test]
fn commands_that_open_an_image_for_writing_store_its_bitmaps_as_qemu_img_does() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    three_bitmaps(d, "b3.qcow2", false);
    fine_bitmap(d, "fine.qcow2");
    // The new snapshot's time stamps differ; all else must not.
    let cases: &[(&str, &[&str], bool)] = &[
        ("check", &["-r", "all"], true),
        ("check", &["-r", "leaks"], true),
        ("amend", &["-o", "lazy_refcounts=on"], true),
        ("snapshot", &["-c", "s1"], false),
        ("rebase", &["-u", "-b", ""], true),
    ];
    let mut n = 0;
    for img in ["b3.qcow2", "fine.qcow2"] {
        for (sub, args, bytes) in cases {
            n += 1;
            let copies = same_on_copies(d, n, img, sub, args, &[]);
            alike(d, copies, &format!("{sub} {args:?} {img}"), *bytes);
        }
    }
    assert_all_same();
}

#[test]
fn bitmap_operations_leave_the_bitmap_set_where_qemu_img_leaves_it() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    three_bitmaps(d, "b3.qcow2", false);
    let cases: &[&[&str]] = &[
        &["--add", "-g", "1M"],
        &["--clear"],
        &["--disable"],
        &["--enable"],
        &["--merge", "b1"],
    ];
    let names = ["b9", "b0", "b0", "b2", "b2"];
    for (n, (args, name)) in cases.iter().zip(names).enumerate() {
        let copies = same_on_copies(d, n, "b3.qcow2", "bitmap", args, &[name]);
        alike(d, copies, &format!("bitmap {args:?} {name}"), true);
    }
    assert_all_same();
}

#[test]
fn snapshot_delete_on_an_image_with_bitmaps_leaves_it_as_qemu_img_does() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    three_bitmaps(d, "s.qcow2", true);
    let copies = same_on_copies(d, 1, "s.qcow2", "snapshot", &["-d", "s0"], &[]);
    alike(d, copies, "snapshot -d s0", true);
    assert_all_same();
}

/// Bitmaps a program without bitmap support may have changed: a version 2
/// image that kept its bitmaps extension (qemu-img's own downgrade keeps it),
/// and a version 3 image whose autoclear bit was cleared. Each open warns as
/// QEMU's driver warns (the leak hint without a line end), a writable open
/// drops the extension from the header, and a repair frees the clusters.
#[test]
fn stale_bitmaps_are_warned_about_and_dropped_from_a_writable_image_like_qemu_img() {
    let steps: &[&str] = &[
        "info v2.qcow2",
        "info v3.qcow2",
        "check v2.qcow2",
        "check v3.qcow2",
        "map --output=json v3.qcow2",
        "convert -O qcow2 v2.qcow2 out2.qcow2",
        "convert --bitmaps -O qcow2 v3.qcow2 out3.qcow2",
        "create -f qcow2 -b v3.qcow2 -F qcow2 ov.qcow2",
        "info --backing-chain ov.qcow2",
        "bitmap --add v3.qcow2 fresh",
        "amend -o lazy_refcounts=on v2.qcow2",
        "info v3.qcow2",
        "check -r all v3.qcow2",
        "check -r all v2.qcow2",
        "info v2.qcow2",
    ];
    let setup = "qemu-img create -q -f qcow2 v2.qcow2 8M
         qemu-img bitmap --add v2.qcow2 b0
         qemu-io -c 'write -P 7 0 64k' v2.qcow2 >/dev/null
         cp v2.qcow2 v3.qcow2
         qemu-img amend -o compat=0.10 v2.qcow2 2>/dev/null
         printf '\\0\\0\\0\\0\\0\\0\\0\\0' | dd of=v3.qcow2 bs=1 seek=88 conv=notrunc status=none";
    let root = tempfile::tempdir().unwrap();
    common::same_files(root.path(), "stale", setup, steps, false);
    assert_all_same();
}
