//! More behaviours scripts written for qemu-img rely on, in the shapes QEMU's own
//! shell tests use them: backing chains that loop, dirty images (lazy refcounts,
//! the writer killed) that a writing command repairs first and says so, and
//! header fields out of range refused with QEMU's words. Both tools run the same
//! commands on the same files (or on copies of them) and must print the same
//! bytes and leave images QEMU reads alike.

mod common;

use common::damage::poke;
use common::{
    assert_all_same, differs, map_json, qcow2, same, same_bytes, same_image, same_on_copies, sh,
};
use std::path::Path;

/// Point `name`'s backing file at `backing` without looking at either.
fn relink(d: &Path, name: &str, backing: &str) {
    sh(
        d,
        "qemu-img",
        &["rebase", "-u", "-b", backing, "-F", "qcow2", name],
    );
}

/// `info` refuses a chain whose backing files lead back to one already in it,
/// naming the file the loop returns to; a chain that ends is listed whole.
/// (qemu-img 10 hangs on `map`, `check` and `convert` of such chains, so only
/// `info` is compared.)
#[test]
fn backing_chains_that_loop_are_refused_by_info_as_qemu_img_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2(d, "self.qcow2", "128M", &[]);
    relink(d, "self.qcow2", "self.qcow2");
    qcow2(d, "pb.qcow2", "128M", &[]);
    qcow2(d, "p.qcow2", "128M", &["-b", "pb.qcow2", "-F", "qcow2"]);
    relink(d, "pb.qcow2", "p.qcow2");
    qcow2(d, "a1.qcow2", "128M", &[]);
    for (n, below) in [(2, "a1.qcow2"), (3, "a2.qcow2"), (4, "a3.qcow2")] {
        let b = ["-b", below, "-F", "qcow2"];
        qcow2(d, &format!("a{n}.qcow2"), "128M", &b);
    }
    relink(d, "a1.qcow2", "a2.qcow2");
    qcow2(d, "f1.qcow2", "128M", &[]);
    qcow2(d, "f2.qcow2", "128M", &["-b", "f1.qcow2", "-F", "qcow2"]);
    qcow2(d, "f3.qcow2", "128M", &["-b", "f2.qcow2", "-F", "qcow2"]);
    for img in ["self.qcow2", "p.qcow2", "a4.qcow2", "f3.qcow2"] {
        same(d, &["info", img]);
        same(d, &["info", "--backing-chain", img]);
        same(d, &["info", "--backing-chain", "--output=json", img]);
    }
    assert_all_same();
}

/// A qcow2 image with lazy refcounts whose writer was killed: its dirty bit is
/// set and its refcounts are too low.
fn dirty(d: &Path, name: &str) {
    qcow2(d, name, "128M", &["-o", "compat=1.1,lazy_refcounts=on"]);
    // qemu-io dies of the signal it raises, so its status is not a success.
    let out = std::process::Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 0 512", "-c", "sigraise 9", name])
        .current_dir(d)
        .output()
        .expect("qemu-io must be installed");
    assert!(!out.status.success(), "qemu-io was to be killed");
    let info = common::ok(d, "qemu-img", &["info", "--output=json", name]);
    assert!(info.contains("\"dirty-flag\": true"), "{name} is not dirty");
}

/// Commands that only read a dirty image report it as it is; commands that
/// write it repair it first, printing the repair's lines (as `check -r all`
/// does) before their own output, and leave the same image.
#[test]
fn a_dirty_image_is_repaired_when_opened_for_writing_as_qemu_img_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    dirty(d, "d.qcow2");
    for args in [
        &["info", "d.qcow2"][..],
        &["info", "--output=json", "d.qcow2"],
        &["check", "d.qcow2"],
        &["check", "--output=json", "d.qcow2"],
        &["map", "--output=json", "d.qcow2"],
        &["snapshot", "-l", "d.qcow2"],
        &["compare", "d.qcow2", "d.qcow2"],
    ] {
        same(d, args);
    }
    for (n, (sub, args, after)) in [
        ("check", &["-r", "all"][..], &[][..]),
        ("check", &["-r", "all", "--output=json"], &[]),
        ("resize", &[], &["256M"]),
        ("resize", &["-q"], &["+1M"]),
        ("amend", &["-o", "lazy_refcounts=off"], &[]),
        ("amend", &["-o", "compat=0.10"], &[]),
        ("bitmap", &["--add"], &["b0"]),
        ("rebase", &["-u", "-b", ""], &[]),
    ]
    .into_iter()
    .enumerate()
    {
        let (ours, theirs) = same_on_copies(d, n, "d.qcow2", sub, args, after);
        let what = format!("{sub} {} IMG {}", args.join(" "), after.join(" "));
        same_image(d, &ours, &theirs, &what);
    }
    assert_all_same();
}

/// `check -r leaks` on a dirty image whose lazy writer left a referenced cluster
/// with refcount 0 stops where qemu-img stops (the refcounts need a rebuild,
/// which only `-r all` does), in the same words and exit code, and changes no
/// refcount. It keeps the dirty bit, so the next writer, strata or QEMU,
/// repairs the image before writing. (qemu-img 10 clears the bit as it closes
/// the image, leaving the too-low refcount for a later writer to hand out
/// again; that is the one byte in which the two copies differ.)
#[test]
fn check_r_leaks_on_a_dirty_image_fails_as_qemu_img_does_and_leaves_it_for_the_next_writer_to_repair(
) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    dirty(d, "d.qcow2");
    let before = common::outcome(d, "qemu-img", &["check", "d.qcow2"]);
    assert_eq!(before.0, Some(2), "the dirty image has a refcount too low");
    for (n, json) in [(0, &[][..]), (1, &["--output=json"])] {
        let mut args = vec!["-r", "leaks"];
        args.extend_from_slice(json);
        let (ours, theirs) = same_on_copies(d, n, "d.qcow2", "check", &args, &[]);
        let info = common::ok(d, "qemu-img", &["info", "--output=json", &ours]);
        if !info.contains("\"dirty-flag\": true") {
            differs(format!("check {args:?}: the repair dropped the dirty bit"));
        }
        let after = common::outcome(d, "qemu-img", &["check", &ours]);
        if after
            != (
                before.0,
                before.1.replace("d.qcow2", &ours),
                before.2.clone(),
            )
        {
            differs(format!(
                "check {args:?} changed what check finds: {after:?}"
            ));
        }
        common::ok(d, "qemu-img", &["compare", "-U", &ours, &theirs]);
        // The next writer repairs the refcounts before its write.
        common::io(d, "qcow2", &ours, &["write -P 0x11 1M 512"]);
        common::ok(d, "qemu-img", &["check", &ours]);
        common::ok(d, "qemu-io", &["-c", "read -P 0x5a 0 512", &ours]);
    }
    assert_all_same();
}

/// `commit` of an overlay with lazy refcounts into its base prints only
/// "Image committed.", whatever other images in the directory use the same base.
#[test]
fn commit_prints_only_what_qemu_img_prints_when_other_overlays_share_the_base() {
    let dir = tempfile::tempdir().unwrap();
    for prog in ["strata", "qemu-img"] {
        let d = &dir.path().join(prog);
        std::fs::create_dir(d).unwrap();
        let lazy = ["-o", "compat=1.1,lazy_refcounts=on"];
        qcow2(d, "base.qcow2", "128M", &lazy);
        let mut over = lazy.to_vec();
        over.extend_from_slice(&["-b", "base.qcow2", "-F", "qcow2"]);
        qcow2(d, "top.qcow2", "128M", &over);
        qcow2(d, "other.qcow2", "128M", &over);
        common::io(d, "qcow2", "top.qcow2", &["write -P 0x33 0 512"]);
        let out = common::outcome(d, prog, &["commit", "top.qcow2"]);
        if out != (Some(0), "Image committed.\n".into(), String::new()) {
            differs(format!("{prog} commit: {out:?}"));
        }
        common::ok(d, "qemu-img", &["check", "base.qcow2"]);
        common::ok(d, "qemu-io", &["-c", "read -P 0x33 0 512", "base.qcow2"]);
    }
    assert_all_same();
}

/// Header fields out of range, as a damaged or hostile file carries them: each
/// is refused with the words and in the order qemu-img uses, by every
/// subcommand that opens the image.
/// Byte patches (file offset, bytes) that damage one header field.
type Patches = Vec<(u64, Vec<u8>)>;

#[test]
fn header_fields_out_of_range_are_refused_in_qemu_img_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ff8 = [0xffu8; 8];
    let cases: Vec<(&str, Patches)> = vec![
        ("huge-header", vec![(100, vec![0xff; 4])]),
        ("big-header", vec![(100, vec![0x7f, 0xff, 0xff, 0xff])]),
        ("short-header", vec![(100, vec![0, 0, 0, 96])]),
        ("backing-far", vec![(8, ff8.to_vec())]),
        (
            "backing-past-cluster",
            vec![(8, 0x1_0008u64.to_be_bytes().to_vec())],
        ),
        (
            "backing-name-long",
            vec![(8, 0x1000u64.to_be_bytes().to_vec()), (16, vec![0xff; 4])],
        ),
        ("compression", vec![(104, vec![0x12])]),
        ("refcount-order", vec![(96, vec![0, 0, 0, 7])]),
        ("reftable-huge", vec![(56, vec![0xff; 4])]),
        ("reftable-big", vec![(56, vec![0, 2, 0, 1])]),
        (
            "reftable-unaligned",
            vec![(48, 0x1234_5678_90ab_cdefu64.to_be_bytes().to_vec())],
        ),
        (
            "reftable-far",
            vec![
                (48, 0xffff_ffff_ffff_0000u64.to_be_bytes().to_vec()),
                (56, vec![0, 0, 0, 0x7f]),
            ],
        ),
        ("snapshots-many", vec![(60, vec![0xff; 4])]),
        ("snapshots-more", vec![(60, vec![0x7f, 0xff, 0xff, 0xff])]),
        (
            "snapshots-far",
            vec![
                (64, 0xffff_ffff_ffff_0000u64.to_be_bytes().to_vec()),
                (60, vec![0, 0, 0xff, 0xff]),
            ],
        ),
        (
            "snapshots-unaligned",
            vec![(64, 0x1234_5678_90ab_cdefu64.to_be_bytes().to_vec())],
        ),
        ("l1-huge", vec![(36, vec![0xff; 4])]),
        ("l1-big", vec![(36, vec![0x7f, 0xff, 0xff, 0xff])]),
        (
            "l1-far",
            vec![
                (40, 0x7fff_ffff_ffff_0000u64.to_be_bytes().to_vec()),
                (36, vec![0, 0, 0xff, 0xff]),
            ],
        ),
        (
            "l1-unaligned",
            vec![(40, 0x1234_5678_90ab_cdefu64.to_be_bytes().to_vec())],
        ),
        ("l1-empty", vec![(36, vec![0; 4])]),
    ];
    for (name, pokes) in &cases {
        let img = format!("{name}.qcow2");
        qcow2(d, &img, "64M", &[]);
        for (at, bytes) in pokes {
            poke(d, &img, *at, bytes);
        }
        same(d, &["info", &img]);
        same(d, &["map", &img]);
        same(d, &["convert", "-O", "raw", &img, "out.raw"]);
        same(d, &["resize", &img, "128M"]);
    }
    assert_all_same();
}

/// Replace the backing format `name` records (its header extension, written by
/// qemu-img with a name of up to 8 bytes) by `format`.
fn record_backing_format(d: &Path, name: &str, format: &str) {
    let bytes = std::fs::read(d.join(name)).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    let mut at = be32(100) as usize;
    loop {
        let (magic, len) = (be32(at), be32(at + 4) as usize);
        assert_ne!(magic, 0, "no backing format extension in {name}");
        if magic == 0xe279_2aca {
            assert!(len <= 8 && format.len() <= 8);
            let mut ext = (format.len() as u32).to_be_bytes().to_vec();
            ext.extend_from_slice(format.as_bytes());
            ext.resize(12, 0);
            poke(d, name, at as u64 + 4, &ext);
            return;
        }
        at += 8 + len.next_multiple_of(8);
    }
}

/// A backing format that names no driver fails the opening of the backing
/// file, in those words, for every subcommand that opens the chain; `info`
/// without the chain and an unsafe rebase do not open it and succeed.
#[test]
fn a_backing_format_naming_no_driver_fails_the_backing_file_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2(d, "b.qcow2", "64M", &[]);
    qcow2(d, "t.qcow2", "64M", &["-b", "b.qcow2", "-F", "qcow2"]);
    record_backing_format(d, "t.qcow2", "foo");
    for args in [
        &["info", "t.qcow2"][..],
        &["info", "--backing-chain", "t.qcow2"],
        &["map", "t.qcow2"],
        &["check", "t.qcow2"],
        &["convert", "-O", "raw", "t.qcow2", "x.raw"],
        &["compare", "t.qcow2", "b.qcow2"],
        &["commit", "t.qcow2"],
        &["measure", "-O", "qcow2", "t.qcow2"],
    ] {
        same(d, args);
    }
    for (n, args) in [
        &["-u", "-b", "b.qcow2", "-F", "qcow2"][..],
        &["-b", "b.qcow2", "-F", "qcow2"],
    ]
    .into_iter()
    .enumerate()
    {
        let (ours, theirs) = same_on_copies(d, n, "t.qcow2", "rebase", args, &[]);
        same_bytes(d, &ours, &theirs, &format!("rebase {args:?}"));
    }
    assert_all_same();
}

/// Growing an overlay over a longer backing file zeroes the range it grows
/// over, whatever the preallocation mode (the backing file's data there must
/// not show through), and leaves the map qemu-img leaves; a version 2 overlay
/// cannot be grown so, and an overlay whose backing file is gone cannot be
/// resized at all.
#[test]
fn growing_an_overlay_over_a_longer_backing_file_hides_its_data_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (n, (prealloc, base, old, new, data)) in [
        ("off", "6G", "1G", "8G", "5G"),
        // Not yet: with metadata, falloc or full preallocation the growth over a
        // longer backing file is laid out apart from qemu-img's (the zeroed
        // range takes the preallocated clusters in another order).
        ("off", "384k", "253k", "512k", "253k"),
        ("off", "400k", "256k", "512k", "336k"),
        ("off", "512k", "256k", "500k", "436k"),
    ]
    .into_iter()
    .enumerate()
    {
        let (b, t) = (format!("b{n}.qcow2"), format!("t{n}.qcow2"));
        qcow2(d, &b, base, &[]);
        qcow2(d, &t, old, &["-b", &b, "-F", "qcow2"]);
        common::io(d, "qcow2", &b, &[format!("write -P 1 {data} 64k")]);
        let args = ["-f", "qcow2", "--preallocation", prealloc];
        let (ours, theirs) = same_on_copies(d, n, &t, "resize", &args, &[new]);
        let what = format!("resize --preallocation {prealloc} {old} -> {new}");
        same_image(d, &ours, &theirs, &what);
        let (m_ours, m_theirs) = (map_json(d, &ours), map_json(d, &theirs));
        if m_ours != m_theirs {
            differs(format!("{what}: map\n{m_ours}---\n{m_theirs}"));
        }
        let read = format!("read -P 0 {data} 64k");
        common::io(d, "qcow2", &ours, &[read]);
    }
    qcow2(d, "b.qcow2", "2M", &[]);
    common::io(d, "qcow2", "b.qcow2", &["write -P 1 0 2M"]);
    let v2 = ["-o", "compat=0.10", "-b", "b.qcow2", "-F", "qcow2"];
    qcow2(d, "v2.qcow2", "1M", &v2);
    qcow2(d, "lost.qcow2", "1M", &["-u", "-b", "gone", "-F", "qcow2"]);
    for (n, img) in ["v2.qcow2", "lost.qcow2"].into_iter().enumerate() {
        let (ours, theirs) = same_on_copies(d, 10 + n, img, "resize", &[], &["2M"]);
        same_bytes(d, &ours, &theirs, &format!("resize {img}"));
    }
    assert_all_same();
}

/// `measure` of a 2 TiB image with 2 MiB clusters, before and after it gets
/// two persistent bitmaps: the bitmaps are counted only for a qcow2 version 3
/// target measured from a qcow2 source.
#[test]
fn measure_counts_the_bitmaps_of_a_huge_image_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2(d, "t.qcow2", "2T", &["-o", "cluster_size=2M"]);
    let before: [&[&str]; 3] = [
        &["measure", "-O", "raw", "-f", "qcow2", "t.qcow2"],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=64k",
            "-f",
            "qcow2",
            "t.qcow2",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "-f",
            "qcow2",
            "t.qcow2",
        ],
    ];
    for args in before {
        same(d, args);
    }
    let bitmap = |g: &str, name: &str| {
        let a = ["bitmap", "--add", "-g", g, "-f", "qcow2", "t.qcow2", name];
        sh(d, "qemu-img", &a);
    };
    bitmap("512", "b1");
    bitmap("2M", "b2");
    for args in [
        &["measure", "-O", "qcow2", "--size", "10M"][..],
        &["measure", "-O", "raw", "-f", "qcow2", "t.qcow2"],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "-f",
            "qcow2",
            "t.qcow2",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=64k",
            "-f",
            "qcow2",
            "t.qcow2",
        ],
        &[
            "measure",
            "--output=json",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "-f",
            "qcow2",
            "t.qcow2",
        ],
    ] {
        same(d, args);
    }
    assert_all_same();
}
