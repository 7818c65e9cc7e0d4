//! Hostile and damaged qcow2 images (QEMU's iotests 080 and 214 and crafted
//! corruptions): what both tools print, their exit codes and the files they
//! leave. Each tool runs the same command on its own copy of one fixture.
//! Where qemu-img's failed operation leaves damage behind (leaked clusters)
//! and strata refuses before writing anything, strata's copy must be the
//! fixture unchanged and consistent by qemu-img's check.

mod common;

use common::{assert_all_same, differs, ok, same, same_files, same_on_copies, sh};
use std::path::Path;

/// A shell function writing `printf`-escaped bytes at an offset of a file,
/// as the iotests' `poke_file` does.
const POKE: &str =
    "poke() { printf \"$3\" | dd of=\"$1\" bs=1 seek=$(($2)) conv=notrunc status=none; }\n";

/// Overwrite the first 16 bytes of the compressed data that L2 entry `index`
/// of the first L2 table points at (argv: file, index), so it no longer
/// decompresses.
const SPOIL_COMPRESSED: &str = r#"
import struct, sys
f, idx = sys.argv[1], int(sys.argv[2])
b = bytearray(open(f, 'rb').read())
cb = struct.unpack('>I', b[20:24])[0]
l1 = struct.unpack('>Q', b[40:48])[0]
l2 = struct.unpack('>Q', b[l1:l1 + 8])[0] & 0x00fffffffffffe00
e = struct.unpack('>Q', b[l2 + 8 * idx:l2 + 8 * idx + 8])[0]
off = e & ((1 << (62 - (cb - 8))) - 1)
b[off:off + 16] = b'\xff' * 16
open(f, 'wb').write(b)
"#;

/// Run `script` (bash, with `poke`) in `dir`.
fn fixture(dir: &Path, script: &str) {
    std::fs::create_dir_all(dir).unwrap();
    sh(dir, "bash", &["-ec", &format!("{POKE}{script}")]);
}

/// 214 and a compressed cluster whose data is garbage: `compare`, `convert`
/// and `map` fail (or not) as qemu-img does. A read that meets data that does
/// not decompress is an I/O error at that cluster's guest offset: compare
/// exits 4 with "Error while reading offset N of IMG: Input/output error",
/// convert says "error while reading at byte N", dd "error while reading
/// from input image file", rebase "error while reading from old (or new)
/// backing file".
#[test]
fn undecompressable_clusters_fail_reads_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("fix")).unwrap();
    std::fs::write(d.join("spoil.py"), SPOIL_COMPRESSED).unwrap();
    let setup = "python3 ../spoil.py img 5 >/dev/null";
    // 214's shapes: 2 MiB clusters whose descriptors claim too few sectors.
    same_files(
        d,
        "short-descriptor",
        &format!(
            "{POKE}qemu-img create -q -f qcow2 -o cluster_size=2M img 8M
             qemu-io -c 'write -c -P 0x11 0 2M' -c 'write -c -P 0x11 2M 2M' img >/dev/null
             poke img $((0x800000)) '\\x40\\x06'
             cp img img2
             poke img2 $((0x800000)) '\\x7f\\xfe'
             poke img2 $((0x800008)) '\\x7f\\xfe'
             cp img img4
             poke img4 $((0x800000)) '\\x40\\x00'"
        ),
        &[
            "compare img img2",
            "compare img2 img",
            "compare img4 img",
            "compare -q img4 img",
            "map --output=json img4",
            "check img4",
        ],
        false,
    );
    // Garbage where the sixth 64 KiB cluster's compressed data is. qemu-io
    // compresses clusters in parallel, so their places vary from run to run:
    // both tools get copies of one fixture.
    fixture(
        &d.join("fix"),
        &format!(
            "qemu-img create -q -f qcow2 img 8M
             qemu-io -c 'write -c -P 0x11 0 1M' img >/dev/null
             cp img clean
             qemu-img create -q -f qcow2 plain 8M
             qemu-io -c 'write -P 0x11 0 1M' plain >/dev/null
             {setup}"
        ),
    );
    let copy = "cp ../fix/img ../fix/clean ../fix/plain .";
    same_files(
        d,
        "garbage",
        copy,
        &[
            "compare img clean",
            "compare clean img",
            "compare img plain",
            "compare -f qcow2 -F qcow2 plain img",
            "map --output=json img",
            "check img",
        ],
        false,
    );
    // convert reads compressed clusters one at a time, eight requests in
    // flight: how many of those before the bad one qemu-img has written when
    // it stops depends on thread timing (seen: none mostly, some at times,
    // all of them with -m 1), so only what it prints is compared. dd reads in
    // order, one request at a time: its output file is compared too.
    let converts = d.join("convert-printed");
    std::fs::create_dir(&converts).unwrap();
    sh(&converts, "bash", &["-ec", copy]);
    for step in [
        "convert -O raw img out",
        "convert -O qcow2 img out",
        "convert -m 1 -O raw img out",
    ] {
        same(&converts, &step.split(' ').collect::<Vec<_>>());
    }
    for (n, step) in [
        ("dd-64k", "dd if=img of=out bs=64k"),
        ("dd-1m", "dd -O qcow2 if=img of=out bs=1M"),
    ] {
        same_files(d, n, copy, &[step], false);
    }
    // rebase reads 2 MiB at a time, in order: the pieces before the one
    // holding the bad cluster (at 2.5 MiB) are copied, then it stops, naming
    // the backing file whose read failed and not why.
    fixture(
        &d.join("fix-rebase"),
        "qemu-img create -q -f qcow2 img 8M
         qemu-io -c 'write -c -P 0x11 0 4M' img >/dev/null
         python3 ../spoil.py img 40 >/dev/null
         qemu-img create -q -f qcow2 -b img -F qcow2 top 8M
         qemu-img create -q -f qcow2 other 8M
         qemu-img create -q -f qcow2 -b other -F qcow2 top2 8M",
    );
    let copy = "cp ../fix-rebase/* .";
    for (n, steps) in [
        (
            "rebase-old",
            ["rebase -b other -F qcow2 top", "map --output=json top"],
        ),
        (
            "rebase-new",
            ["rebase -p -b img -F qcow2 top2", "map --output=json top2"],
        ),
        ("rebase-none", ["rebase -b  top", "map --output=json top"]),
    ] {
        same_files(d, n, copy, &steps, false);
    }
    assert_all_same();
}

/// 080's "Invalid L2 entry (huge physical offset)": an L2 entry pointing far
/// past the end of the file (with and without reserved bits). `snapshot -c`
/// fails as qemu-img's does, with its error number (EFBIG where the refcount
/// table would pass 8 MiB, EAGAIN where a refcount block would be made),
/// but before writing anything: qemu-img's attempt leaks clusters, strata
/// leaves the image as it was (where it used to grow the file to the
/// entry's offset, a terabyte for the second image).
#[test]
fn snapshot_of_entries_past_any_refcount_block_is_refused_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(
        d,
        "qemu-img create -q -f qcow2 img 64M
         qemu-io -c 'write 0 512' img >/dev/null
         cp img img2
         poke img $((0x40000)) '\\xbf\\xff\\xff\\xff\\xff\\xff\\x00\\x00'
         poke img2 $((0x40000)) '\\x80\\x00\\x00\\xff\\xff\\xff\\x00\\x00'",
    );
    for (n, img) in ["img", "img2"].into_iter().enumerate() {
        let (ours, _) = same_on_copies(d, n, img, "snapshot", &["-c", "test"], &[]);
        if std::fs::read(d.join(&ours)).unwrap() != std::fs::read(d.join(img)).unwrap() {
            differs(format!("snapshot -c {img}: strata changed the image"));
        }
        // Both copies' views after the failure: strata's is the fixture's.
        let before = common::outcome(d, "qemu-img", &["check", img]);
        let after = common::outcome(d, "qemu-img", &["check", &ours]);
        if before.0 != after.0 || before.1 != after.1 {
            differs(format!(
                "check of strata's {img} after snapshot -c: {after:?}"
            ));
        }
    }
    // A healthy image still takes its snapshot.
    fixture(
        &d.join("healthy"),
        "qemu-img create -q -f qcow2 img 64M
         qemu-io -c 'write 0 1M' -c 'write -c 2M 64k' img >/dev/null",
    );
    let h = d.join("healthy");
    common::run(&h, "strata", &["snapshot", "-c", "s", "img"]);
    ok(&h, "qemu-img", &["check", "img"]);
    assert!(ok(&h, "qemu-img", &["snapshot", "-l", "img"]).contains(" s "));
    assert_all_same();
}

/// L1 and L2 entries with reserved bits set (high and low ones, and with
/// extended L2 the zero flag, reserved there): qemu-img ignores the bits when
/// it reads, so `map`, `convert`, `compare`, `dd` and `measure` work and read
/// the cluster the offset field names; only `check` reports the entry (exit 2),
/// and `check -r all` leaves it as it is. strata reads and reports the same.
#[test]
fn reserved_bits_in_l1_and_l2_entries_are_read_past_and_only_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The fixture's L1 table is at 0x30000 and its L2 table at 0x40000
    // (as with extended L2, whose first bitmap follows at 0x40008).
    let setup = format!(
        "{POKE}qemu-img create -q -f qcow2 clean 64M
         qemu-io -c 'write -P 0x11 0 128k' -c 'write -P 0x22 1M 64k' clean >/dev/null
         cp clean l2hi; poke l2hi $((0x40000)) '\\x81'
         cp clean l2lo; poke l2lo $((0x40006)) '\\x00\\x02'
         cp clean l2all; poke l2all $((0x40008)) '\\xbf\\x00\\x00\\x00\\x00\\x06\\x01\\xfe'
         cp clean l1hi; poke l1hi $((0x30000)) '\\x84'
         cp clean l1lo; poke l1lo $((0x30006)) '\\x01\\x01'
         qemu-img create -q -f qcow2 -o extended_l2=on xclean 64M
         qemu-io -c 'write -P 0x33 0 96k' xclean >/dev/null
         cp xclean xzero; poke xzero $((0x40007)) '\\x01'"
    );
    let imgs = ["l2hi", "l2lo", "l2all", "l1hi", "l1lo", "xzero"];
    let mut steps = Vec::new();
    for img in imgs {
        let clean = if img.starts_with('x') {
            "xclean"
        } else {
            "clean"
        };
        steps.extend([
            format!("map {img}"),
            format!("map --output=json {img}"),
            format!("convert -O raw {img} {img}.raw"),
            format!("convert -O qcow2 {img} {img}.qcow2"),
            format!("compare {img} {clean}"),
            format!("dd if={img} of={img}.dd bs=64k"),
            format!("measure -O qcow2 {img}"),
            format!("check {img}"),
            format!("check --output=json {img}"),
        ]);
    }
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    same_files(d, "read", &setup, &steps, false);
    for (n, img) in imgs.into_iter().enumerate() {
        same_files(
            d,
            &format!("repair{n}"),
            &setup,
            &[&format!("check -r all {img}"), &format!("check {img}")],
            false,
        );
    }
    assert_all_same();
}

/// Make `base` (one snapshot `test`, then a write) in `dir` and copies of it
/// whose snapshot L1 table is damaged as in 080: `unal` (offset not
/// cluster-aligned), `big` (more than 32 MiB of entries) and `eof` (aligned,
/// far past the end of the file).
fn bad_snapshot_l1_fixture(dir: &Path) {
    fixture(
        dir,
        "qemu-img create -q -f qcow2 base 64M
         qemu-io -c 'write -P 0x11 0 128k' base >/dev/null
         qemu-img snapshot -c test base
         qemu-io -c 'write -P 0x22 64k 64k' base >/dev/null
         st=$((0x$(od -An -t x8 --endian=big -j 64 -N 8 base | tr -d ' ')))
         cp base unal; poke unal $st '\\x00\\x00\\x00\\x00\\x00\\x40\\x02\\x00'
         cp base big; poke big $((st + 8)) '\\x10\\x00\\x00\\x00'
         cp base eof; poke eof $st '\\x00\\x00\\x00\\x10\\x00\\x00\\x00\\x00'",
    );
}

/// 080's invalid snapshot L1 tables: qemu-img opens such an image, and
/// `info`, `check`, `map`, `snapshot -l`, `convert` and `compare` work on it;
/// only a use of the snapshot is refused, in QEMU's words ("Snapshot L1 table
/// offset invalid" / "too large"): `convert -l`, `snapshot -a` (the reason,
/// then "Failed to load snapshot: Invalid argument" / "File too large"),
/// `snapshot -d`, and `amend -o compat=0.10` ("Failed to turn zero into data
/// clusters: ..."), each leaving the file as it was. A table past the end of
/// the file reads as zeros (an empty table) for `convert -l` and the amend, as
/// in QEMU. strata matches all of this, byte for byte in the files.
#[test]
fn invalid_snapshot_l1_tables_open_and_only_their_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    bad_snapshot_l1_fixture(&d.join("fix"));
    let copy = "cp ../fix/* .";
    let mut steps = Vec::new();
    for img in ["unal", "big", "eof"] {
        steps.extend([
            format!("info {img}"),
            format!("check {img}"),
            format!("check --output=json {img}"),
            format!("map --output=json {img}"),
            format!("snapshot -l {img}"),
            format!("convert -O raw {img} {img}.raw"),
            format!("convert -l test -O raw {img} {img}.l"),
            format!("compare {img} base"),
        ]);
    }
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    same_files(d, "read", copy, &steps, false);
    let mut n = 0;
    for img in ["unal", "big"] {
        for step in [
            "snapshot -a test",
            "snapshot -d test",
            "amend -o compat=0.10",
        ] {
            n += 1;
            same_files(
                d,
                &format!("use{n}"),
                copy,
                &[&format!("{step} {img}")],
                false,
            );
        }
    }
    for (n, (step, img)) in [
        ("amend -o compat=0.10", "eof"),
        ("check -r all", "unal"),
        ("check -r all", "eof"),
    ]
    .into_iter()
    .enumerate()
    {
        let step = format!("{step} {img}");
        let after = format!("check {img}");
        same_files(d, &format!("change{n}"), copy, &[&step, &after], false);
    }
    assert_all_same();
}

/// Where strata deliberately differs on the images of
/// [`invalid_snapshot_l1_tables_open_and_only_their_use_is_refused`]:
/// - `snapshot -a test` and `snapshot -d test` on `eof`: qemu-img applies a
///   table past the end of the file as zeros (the disk goes empty and the
///   active clusters are freed) and deletes the entry ("qcow2_free_clusters
///   failed: Resource temporarily unavailable", exit 0). strata refuses
///   both (exit 1, the table lies past the end of the file) and writes
///   nothing: a table that is not in the file is no snapshot to revert to.
/// - `check -r all big` and `snapshot -c new big`: qemu-img counts the
///   snapshot's 2 GiB table as metadata, refuses its own repair's (or the new
///   snapshot's) writes as overlapping it, marks the image corrupt and fails
///   (exit 1). strata writes around it: the repair mends the leaks and the
///   flags (exit 2, the entry is still reported), the snapshot is made, and
///   the image is not marked corrupt; qemu-img's check then reports only
///   the entry (and for the snapshot the leaks that were there before).
#[test]
fn a_snapshot_l1_table_past_the_end_or_too_large_is_never_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    bad_snapshot_l1_fixture(d);
    for (n, args) in [&["-a", "test"], &["-d", "test"]].into_iter().enumerate() {
        let f = format!("s{n}");
        std::fs::copy(d.join("eof"), d.join(&f)).unwrap();
        let mut a = vec!["snapshot"];
        a.extend_from_slice(args);
        a.push(&f);
        let (code, out, err) = common::outcome(d, "strata", &a);
        assert_eq!((code, out.as_str()), (Some(1), ""), "{err}");
        assert!(err.contains("past the end of the file"), "{err}");
        assert_eq!(
            std::fs::read(d.join(&f)).unwrap(),
            std::fs::read(d.join("eof")).unwrap()
        );
        // qemu-img goes on (the behaviour strata declines).
        std::fs::copy(d.join("eof"), d.join("q")).unwrap();
        a.pop();
        a.push("q");
        assert_eq!(common::outcome(d, "qemu-img", &a).0, Some(0));
    }
    let qemu_check = |f: &str| common::outcome(d, "qemu-img", &["check", f]);
    std::fs::copy(d.join("big"), d.join("r")).unwrap();
    let (code, _, err) = common::outcome(d, "strata", &["check", "-r", "all", "r"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, out, err) = qemu_check("r");
    assert_eq!(code, Some(2));
    assert_eq!(
        err,
        "ERROR snapshot 1 (test) l1_size=0x10000000: L1 table is too large; \
         snapshot table entry corrupted\n"
    );
    assert!(
        out.contains("1 errors were found") && !out.contains("leaked"),
        "{out}"
    );
    std::fs::copy(d.join("big"), d.join("c")).unwrap();
    ok(d, "strata", &["snapshot", "-c", "new", "c"]);
    assert!(ok(d, "qemu-img", &["snapshot", "-l", "c"]).contains(" new "));
    let (code, out, _) = qemu_check("c");
    assert_eq!(code, Some(2));
    assert!(out.contains("1 errors were found"), "{out}");
    for f in ["r", "c"] {
        let info = ok(d, "qemu-img", &["info", f]);
        assert!(info.contains("corrupt: false"), "{info}");
    }
    // qemu-img's own repair fails and leaves the image marked corrupt.
    std::fs::copy(d.join("big"), d.join("q")).unwrap();
    assert_eq!(
        common::outcome(d, "qemu-img", &["check", "-r", "all", "q"]).0,
        Some(1)
    );
    assert!(ok(d, "qemu-img", &["info", "q"]).contains("corrupt: true"));
}

/// A snapshot table past the end of the file: qemu-img opens the image and
/// reads the table as zeros, so `info` and `snapshot -l` show a row with an
/// empty ID and name, `map` and `convert` work, `convert -l test` finds no
/// such snapshot and `check` reports the incomplete entry and the table past
/// the end. strata shows and refuses the same.
#[test]
fn a_snapshot_table_past_the_end_of_the_file_reads_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    bad_snapshot_l1_fixture(&d.join("fix"));
    fixture(
        &d.join("fix"),
        "cp base stp; poke stp 64 '\\x00\\x00\\x00\\x00\\x10\\x00\\x00\\x00'",
    );
    same_files(
        d,
        "table",
        "cp ../fix/stp .",
        &[
            "info stp",
            "info --output=json stp",
            "snapshot -l stp",
            "map --output=json stp",
            "convert -O raw stp stp.raw",
            "convert -l test -O raw stp stp.l",
            "check stp",
            "check --output=json stp",
        ],
        false,
    );
    assert_all_same();
}

/// Set the extra-data length of the last snapshot table entry of `img` (argv:
/// file, new length), as 261 does to reject too much unknown extra data.
const GROW_LAST_EXTRA: &str = r#"
import struct, sys
f, n = sys.argv[1], int(sys.argv[2])
b = bytearray(open(f, 'rb').read())
count = struct.unpack('>I', b[60:64])[0]
at = struct.unpack('>Q', b[64:72])[0]
for i in range(count):
    last = at
    idl, nl = struct.unpack('>HH', b[at + 12:at + 16])
    el = struct.unpack('>I', b[at + 36:at + 40])[0]
    at += (40 + el + idl + nl + 7) // 8 * 8
b[last + 36:last + 40] = struct.pack('>I', n)
open(f, 'wb').write(b)
"#;

/// Run `check` with `args` on copies of `img` in `d` (copy set `n`) with both
/// tools; a check that does not repair must leave the file as it was, and a
/// repair must leave the same bytes as qemu-img's and an image qemu-img's own
/// check judges alike (`checks` lists the modes to run).
fn same_checks(d: &Path, n: &mut usize, img: &str, checks: &[&[&str]]) {
    let fixture = std::fs::read(d.join(img)).unwrap();
    for args in checks {
        *n += 1;
        let (ours, theirs) = same_on_copies(d, *n, img, "check", args, &[]);
        let what = format!("check {} {img}", args.join(" "));
        if !args.contains(&"-r") && std::fs::read(d.join(&ours)).unwrap() != fixture {
            differs(format!("{what}: strata changed the image"));
        }
        common::same_bytes(d, &ours, &theirs, &what);
        let view = |f: &str| {
            let (code, out, err) = common::outcome(d, "qemu-img", &["check", f]);
            (code, out.replace(f, "IMG"), err.replace(f, "IMG"))
        };
        if view(&ours) != view(&theirs) {
            differs(format!(
                "{what}: qemu-img check of the results: strata's {:?}, qemu-img's {:?}",
                view(&ours),
                view(&theirs)
            ));
        }
    }
}

/// 261's "Reject too much unknown extra data": a snapshot table entry with
/// 64 KiB of extra data (the limit is 1 KiB). qemu-img refuses to open the
/// image ("Too much extra metadata in snapshot table entry 3" and the hint to
/// use `check -r all`), so `info` and `snapshot -l` fail; `check` and `check
/// -r leaks` fail with the same words and "File too large" (exit 1) and write
/// nothing. `check -r all` discards all but the first 1 KiB, counts the table
/// as spanning the cluster the excess ran into (refcount 0: a refcount
/// rebuild), rewrites the table, and the image then opens. strata, which used
/// to refuse the image in its own words even for `check -r all`, does the
/// same, to the same bytes.
#[test]
fn too_much_snapshot_extra_data_is_refused_until_check_r_all_discards_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("grow.py"), GROW_LAST_EXTRA).unwrap();
    fixture(
        d,
        "qemu-img create -q -f qcow2 img 64M
         for s in sn0 sn1 sn2 sn3; do qemu-img snapshot -c $s img; done
         python3 grow.py img 65536
         cp img small; python3 grow.py small 1025",
    );
    let mut n = 0;
    for img in ["img", "small"] {
        refused_until_check_r_all(
            d,
            &mut n,
            img,
            &[
                &[],
                &["--output=json"],
                &["-r", "leaks"],
                &["-r", "all"],
                &["-r", "all", "--output=json"],
            ],
        );
    }
    assert_all_same();
}

/// `info` and `snapshot -l` of `img` in `d` (copy set `n` on), then each
/// check mode ([`same_checks`]), and after `check -r all` `snapshot -l` and
/// `check` of the repaired copies: both tools print the same and leave the
/// same bytes.
fn refused_until_check_r_all(d: &Path, n: &mut usize, img: &str, checks: &[&[&str]]) {
    for sub in [&["info"][..], &["snapshot", "-l"]] {
        *n += 1;
        let (ours, _) = same_on_copies(d, *n, img, sub[0], &sub[1..], &[]);
        if std::fs::read(d.join(&ours)).unwrap() != std::fs::read(d.join(img)).unwrap() {
            differs(format!("{sub:?} {img}: strata changed the image"));
        }
    }
    same_checks(d, n, img, checks);
    // The repaired images open again, with the same snapshots.
    *n += 1;
    let (ours, theirs) = same_on_copies(d, *n, img, "check", &["-r", "all"], &[]);
    for sub in [&["snapshot", "-l"][..], &["check"]] {
        let on = |f: &str| -> Vec<String> {
            sub.iter()
                .map(|s| s.to_string())
                .chain([f.to_string()])
                .collect()
        };
        let (a_ours, a_theirs) = (on(&ours), on(&theirs));
        let a_ours: Vec<&str> = a_ours.iter().map(String::as_str).collect();
        let a_theirs: Vec<&str> = a_theirs.iter().map(String::as_str).collect();
        common::same(d, &a_ours);
        let a = common::outcome(d, "qemu-img", &a_ours);
        let b = common::outcome(d, "qemu-img", &a_theirs);
        if a.0 != b.0 || a.1.replace(&ours, "IMG") != b.1.replace(&theirs, "IMG") {
            differs(format!("{sub:?} after check -r all {img}: {a:?} vs {b:?}"));
        }
    }
}

/// Build one of 261's oversized snapshot tables into the new qcow2 image
/// (argv: kind, file), at 1 MiB, with an L2 table at 960 KiB and an L1 table
/// at 896 KiB for the first entry to be discarded, all counted in refcount
/// block 0: `many`, 131072 empty (version 2) entries; `big`, entries of 1 KiB
/// extra data and an ID and name of 65535 bytes each, one more than fit in
/// 64 MiB; `bigextra`, the same with the fourth-last entry's extra data grown
/// so that the table passes 64 MiB two entries before its end unless that
/// extra data is cut to 1 KiB.
const OVERSIZED_TABLE: &str = r#"
import struct, sys, os
M = 1048576
def rd(f, off, fmt):
    with open(f, 'rb') as h:
        h.seek(off); return struct.unpack(fmt, h.read(struct.calcsize(fmt)))[0]
def poke(f, off, data):
    with open(f, 'r+b') as h:
        h.seek(off); h.write(data)
def hook_up(f, end):
    poke(f, M - 2 * 65536, struct.pack('>Q', 0x80000000000f0000))
    rb = rd(f, rd(f, 48, '>Q'), '>Q')
    c, e = (M - 2 * 65536) // 65536, (end + 65535) // 65536
    poke(f, rb + 2 * c, b'\x00\x01' * (e - c))
def table(f, extras):
    off = M
    for i, extra in enumerate(extras):
        e = bytearray(40)
        e[12:16] = b'\xff\xff\xff\xff'
        e[36:40] = struct.pack('>I', extra)
        if i == len(extras) - 1:
            e[0:12] = struct.pack('>QI', 0xe0000, 1)
        poke(f, off, e)
        off = (off + 40 + extra + 2 * 65535 + 7) // 8 * 8
    os.truncate(f, off)
    hook_up(f, off)
    return len(extras)
kind, f = sys.argv[1], sys.argv[2]
sn = 40 + 1024 + 2 * 65535 + 2
n = 64 * M // sn + 1
if kind == 'many':
    count = 131072
    os.truncate(f, M + 40 * count)
    poke(f, M + 40 * 65536, struct.pack('>QI', 0xe0000, 1))
    hook_up(f, M + 40 * count)
elif kind == 'big':
    count = table(f, [1024] * n)
else:
    extra = 64 * M + 8 - sn - ((n - 2) * sn - 1024)
    count = table(f, [1024] * (n - 3) + [extra, 1024, 1024])
poke(f, 60, struct.pack('>IQ', count, M))
"#;

/// 261's "Snapshot table too big" (with and without an entry whose extra data
/// is too much) and "Too many snapshots": qemu-img refuses to open the image
/// ("Snapshot table is too big" with the hint to remove the overhanging
/// snapshots, or "Snapshot table too large"), `check` and `check -r leaks`
/// fail alike, and `check -r all` discards the entries past 64 MiB or past
/// 65536 (the header counts only those kept; their tables and the table's
/// tail leak and are freed), so the image opens again. strata prints, leaves
/// and reopens the same.
#[test]
fn oversized_snapshot_tables_are_refused_until_check_r_all_cuts_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("table.py"), OVERSIZED_TABLE).unwrap();
    fixture(
        d,
        "qemu-img create -q -f qcow2 -o compat=0.10 many 64M
         python3 table.py many many
         for k in big bigextra; do
             qemu-img create -q -f qcow2 $k 64M
             python3 table.py $k $k
         done",
    );
    let mut n = 0;
    // The JSON forms and `-r leaks` (a check) are pinned above; these
    // tables are 64 MiB each.
    for img in ["many", "big", "bigextra"] {
        refused_until_check_r_all(d, &mut n, img, &[&[], &["-r", "all"]]);
    }
    assert_all_same();
}

/// Check messages, exit codes and repairs of metadata that is misplaced or
/// named twice: a refcount block on the L1 table, refcount-table entries of 0
/// (the header) and with reserved bits, two refcount-table entries naming one
/// block, two L1 entries naming one L2 table (with and without the COPIED
/// flag), snapshot L1 and L2 entries with COPIED set (as qemu-img copies them),
/// and extended L2 entries with a subcluster both allocated and zero or a
/// compressed cluster with a bitmap. Each check mode, human and JSON, prints
/// what qemu-img prints and leaves the bytes qemu-img leaves. (An L2 table
/// named twice is judged with the COPIED fixes of its first visit on the
/// second, as qemu-img writes them back at once: strata used to report and
/// count the data entries twice.)
#[test]
fn checks_of_misplaced_and_shared_metadata_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(
        d,
        "qemu-img create -q -f qcow2 base 64M
         qemu-io -c 'write -P 1 0 128k' base >/dev/null
         cp base rb_l1; poke rb_l1 $((0x10000)) '\\x00\\x00\\x00\\x00\\x00\\x03\\x00\\x00'
         cp base rb_hdr; poke rb_hdr $((0x10000)) '\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00'
         cp base rb_res; poke rb_res $((0x10008)) '\\x00\\x00\\x00\\x00\\x00\\x00\\x01\\x00'
         cp base rb_twice; poke rb_twice $((0x10008)) '\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\x00'
         qemu-img create -q -f qcow2 big 2G
         qemu-io -c 'write -P 1 0 128k' big >/dev/null
         cp big l2_twice; poke l2_twice $((0x30008)) '\\x80\\x00\\x00\\x00\\x00\\x04\\x00\\x00'
         cp big l2_twice_nc; poke l2_twice_nc $((0x30008)) '\\x00\\x00\\x00\\x00\\x00\\x04\\x00\\x00'
         qemu-img create -q -f qcow2 snap 64M
         qemu-io -c 'write -P 1 0 128k' snap >/dev/null
         qemu-img snapshot -c s1 snap
         cp snap snap_cow; qemu-io -c 'write -P 2 0 64k' snap_cow >/dev/null
         qemu-img create -q -f qcow2 -o extended_l2=on xl2 64M
         qemu-io -c 'write -P 1 0 64k' -c 'write -c -P 3 64k 64k' xl2 >/dev/null
         cp xl2 xl2_both; poke xl2_both $((0x40008)) '\\x00\\x00\\x00\\x01\\xff\\xff\\xff\\xff'
         cp xl2 xl2_comp; poke xl2_comp $((0x40018)) '\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x01'",
    );
    let mut n = 0;
    for img in [
        "rb_l1",
        "rb_hdr",
        "rb_res",
        "rb_twice",
        "l2_twice",
        "l2_twice_nc",
        "snap",
        "snap_cow",
        "xl2_both",
        "xl2_comp",
    ] {
        same_checks(
            d,
            &mut n,
            img,
            &[
                &[],
                &["--output=json"],
                &["-r", "leaks"],
                &["-r", "leaks", "--output=json"],
                &["-r", "all"],
                &["-r", "all", "--output=json"],
            ],
        );
    }
    assert_all_same();
}
