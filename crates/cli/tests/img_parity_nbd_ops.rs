//! The subcommands that change an image, given an NBD export as the image:
//! create (formatting the export), snapshot, bitmap, amend, resize, rebase,
//! commit, dd, measure, check -r and convert without -n. Each tool works on its
//! own copy of the export's file, served by qemu-nbd and by `strata nbd serve`
//! alike; what they print must be identical, and the two copies must read the
//! same to QEMU afterwards.

mod common;

use common::nbd::{same_on_export, SERVERS};
use common::{assert_all_same, io, ok, sh};
use std::path::Path;

/// Copy the image file `image` into the start of a zeroed file `export` of
/// `size` bytes: an export with room behind the image, as a block device has.
fn embed(d: &Path, image: &str, export: &str, size: u64) {
    let mut bytes = std::fs::read(d.join(image)).unwrap();
    assert!(bytes.len() as u64 <= size);
    bytes.resize(size as usize, 0);
    std::fs::write(d.join(export), bytes).unwrap();
}

/// The exports of the tests, in `d`:
/// - `full.qcow2`: a qcow2 image with data, exactly as long as its file (no room);
/// - `room.raw`: the same image at the start of an 8 MiB export;
/// - `snap.raw`: the same with an internal snapshot `s0` and a bitmap `b0`
///   (`snapnb.raw`: without the bitmap);
/// - `ov.raw`: an overlay on `b/base.qcow2` (named by absolute path) with data
///   (`ov.qcow2`: the overlay as a file);
/// - `blank.raw`: 4 MiB of zeroes; `a.raw`: the image's guest bytes.
fn exports(d: &Path) {
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "full.qcow2", "4M"],
    );
    io(
        d,
        "qcow2",
        "full.qcow2",
        &["write -P 0x11 0 64k", "write -P 0x22 1M 192k"],
    );
    sh(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "full.qcow2", "a.raw"],
    );
    embed(d, "full.qcow2", "room.raw", 8 << 20);
    std::fs::copy(d.join("full.qcow2"), d.join("snap.qcow2")).unwrap();
    sh(d, "qemu-img", &["snapshot", "-c", "s0", "snap.qcow2"]);
    io(d, "qcow2", "snap.qcow2", &["write -P 0x33 2M 64k"]);
    embed(d, "snap.qcow2", "snapnb.raw", 8 << 20);
    sh(d, "qemu-img", &["bitmap", "--add", "snap.qcow2", "b0"]);
    embed(d, "snap.qcow2", "snap.raw", 8 << 20);
    std::fs::create_dir_all(d.join("b")).unwrap();
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "b/base.qcow2", "4M"],
    );
    io(d, "qcow2", "b/base.qcow2", &["write -P 0x44 0 1M"]);
    let base = d.join("b/base.qcow2");
    let base = base.to_str().unwrap();
    sh(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", "ov.qcow2",
        ],
    );
    io(d, "qcow2", "ov.qcow2", &["write -P 0x55 64k 64k"]);
    embed(d, "ov.qcow2", "ov.raw", 4 << 20);
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "blank.raw", "4M"],
    );
}

#[test]
fn create_formats_an_export_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    exports(d);
    let base = d.join("b/base.qcow2");
    let base = base.to_str().unwrap();
    for server in SERVERS {
        for args in [
            vec!["create", "-f", "qcow2", "{URL}", "2M"],
            vec!["create", "-f", "qcow2", "{URL}", "64M"],
            vec![
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k,lazy_refcounts=on",
                "{URL}",
                "1M",
            ],
            vec!["create", "-f", "qcow2", "-b", base, "-F", "qcow2", "{URL}"],
            vec!["create", "-f", "raw", "{URL}", "2M"],
            vec!["create", "-f", "raw", "{URL}", "4M"],
            vec!["create", "-f", "raw", "{URL}", "8M"],
        ] {
            same_on_export(d, server, "room.raw", &args);
        }
        // What was formatted is usable: written to, then read back.
        same_on_export(
            d,
            server,
            "blank.raw",
            &["convert", "-O", "qcow2", "a.raw", "{URL}"],
        );
        same_on_export(
            d,
            server,
            "blank.raw",
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=128k",
                "a.raw",
                "{URL}",
            ],
        );
        same_on_export(
            d,
            server,
            "room.raw",
            &["convert", "-O", "raw", "a.raw", "{URL}"],
        );
        assert_all_same();
    }
}

#[test]
fn snapshots_bitmaps_and_amend_on_qcow2_over_nbd_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    exports(d);
    for server in SERVERS {
        for (image, args) in [
            ("snap.raw", vec!["snapshot", "-l", "{URL}"]),
            ("snap.raw", vec!["snapshot", "-c", "s1", "{URL}"]),
            ("snapnb.raw", vec!["snapshot", "-a", "s0", "{URL}"]),
            ("snap.raw", vec!["snapshot", "-d", "s0", "{URL}"]),
            ("snap.raw", vec!["snapshot", "-d", "nope", "{URL}"]),
            ("room.raw", vec!["snapshot", "-c", "s1", "{URL}"]),
            ("full.qcow2", vec!["snapshot", "-l", "{URL}"]),
            ("snap.raw", vec!["bitmap", "--add", "{URL}", "b1"]),
            (
                "snap.raw",
                vec!["bitmap", "--add", "-g", "128k", "--disable", "{URL}", "b1"],
            ),
            ("snap.raw", vec!["bitmap", "--add", "{URL}", "b0"]),
            ("snap.raw", vec!["bitmap", "--remove", "{URL}", "b0"]),
            ("snap.raw", vec!["bitmap", "--clear", "{URL}", "b0"]),
            ("snap.raw", vec!["bitmap", "--disable", "{URL}", "b0"]),
            (
                "snap.raw",
                vec!["bitmap", "--add", "{URL}", "b1", "--merge", "b0"],
            ),
            (
                "room.raw",
                vec!["amend", "-o", "lazy_refcounts=on", "{URL}"],
            ),
            (
                "room.raw",
                vec!["amend", "-f", "qcow2", "-o", "compat=0.10", "{URL}"],
            ),
            ("room.raw", vec!["amend", "-o", "refcount_bits=8", "{URL}"]),
            (
                "blank.raw",
                vec!["amend", "-o", "lazy_refcounts=on", "{URL}"],
            ),
            ("room.raw", vec!["check", "-r", "all", "{URL}"]),
            ("snap.raw", vec!["info", "{URL}"]),
        ] {
            same_on_export(d, server, image, &args);
        }
        assert_all_same();
    }
}

#[test]
fn resize_rebase_commit_dd_and_measure_on_exports_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    exports(d);
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base2.qcow2", "4M"],
    );
    let base2 = d.join("base2.qcow2");
    let base2 = base2.to_str().unwrap();
    for server in SERVERS {
        for (image, args) in [
            ("room.raw", vec!["resize", "-f", "qcow2", "{URL}", "+1M"]),
            (
                "room.raw",
                vec!["resize", "--shrink", "-f", "qcow2", "{URL}", "2M"],
            ),
            ("room.raw", vec!["resize", "-f", "qcow2", "{URL}", "1M"]),
            ("ov.raw", vec!["rebase", "-u", "-b", "", "{URL}"]),
            (
                "ov.raw",
                vec!["rebase", "-u", "-F", "qcow2", "-b", base2, "{URL}"],
            ),
            (
                "ov.raw",
                vec!["rebase", "-F", "qcow2", "-b", base2, "{URL}"],
            ),
            ("ov.raw", vec!["rebase", "-b", "", "{URL}"]),
            (
                "blank.raw",
                vec![
                    "dd", "-O", "raw", "if=a.raw", "of={URL}", "bs=64k", "count=20",
                ],
            ),
            ("blank.raw", vec!["dd", "-O", "raw", "if=a.raw", "of={URL}"]),
            ("room.raw", vec!["measure", "-O", "qcow2", "{URL}"]),
            (
                "room.raw",
                vec!["measure", "-f", "raw", "-O", "qcow2", "{URL}"],
            ),
            (
                "snap.raw",
                vec!["measure", "--output=json", "-O", "qcow2", "{URL}"],
            ),
            ("room.raw", vec!["commit", "{URL}"]),
        ] {
            same_on_export(d, server, image, &args);
        }
        assert_all_same();
    }
}

#[test]
fn commit_from_an_export_writes_the_overlay_into_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    exports(d);
    std::fs::copy(d.join("b/base.qcow2"), d.join("base.orig")).unwrap();
    for server in SERVERS {
        std::fs::copy(d.join("base.orig"), d.join("b/base.qcow2")).unwrap();
        // Both tools commit into the one base the overlay names, one after the
        // other: the same result twice, and it is the overlay's view.
        same_on_export(d, server, "ov.raw", &["commit", "{URL}"]);
        ok(d, "qemu-img", &["check", "b/base.qcow2"]);
        std::fs::copy(d.join("base.orig"), d.join("b/base.qcow2")).unwrap();
        let sock = d.join("c.sock");
        let sock = sock.to_str().unwrap();
        std::fs::copy(d.join("ov.raw"), d.join("c-ov.raw")).unwrap();
        {
            let _srv = common::nbd::NbdServer::start(
                server,
                &["-f", "raw", "-x", "c", "-k", sock],
                &d.join("c-ov.raw"),
                sock,
            );
            ok(
                d,
                "strata",
                &["commit", &format!("nbd+unix:///c?socket={sock}")],
            );
        }
        ok(d, "qemu-img", &["compare", "b/base.qcow2", "ov.qcow2"]);
        ok(d, "qemu-img", &["check", "b/base.qcow2"]);
        assert_all_same();
    }
}
