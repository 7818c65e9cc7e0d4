//! QEMU's iotests 001-160 that drive `qemu-img` on qcow2 or raw files, in the
//! shapes those scripts give the commands: option parsing at creation (049,
//! 112), zero-sized and tiny images (042, 053), preallocation with every
//! cluster size (079), huge sizes (054), missing backing files (111), `dd`
//! block sizes (159), maps of truncated images (102), rebase over zero
//! clusters (050), `convert -n` (063), refcount widths (112) and hostile header
//! fields (080). Each tool runs the same commands on its own copy of files
//! qemu-img and qemu-io made, and both must print the same and leave the same
//! bytes.

mod common;

use std::path::Path;

use common::{assert_all_same, compare_runs, copy_dir, same_files, sh, FileCheck};

/// A shell function writing `printf`-escaped bytes at an offset of a file,
/// as the iotests' `poke_file` does.
const POKE: &str =
    "poke() { printf \"$3\" | dd of=\"$1\" bs=1 seek=$(($2)) conv=notrunc status=none; }\n";

/// Make the files of `setup` once (so snapshots taken there carry one date),
/// give each tool a copy, run `steps` (space-separated arguments) with each,
/// and record any difference in what they print or leave: the same bytes
/// (`bytes`) or, where the tools take snapshots at different times, the same
/// view to qemu-img (see `common::qemu_views`) and the same guest data.
fn same_after(root: &Path, n: &str, setup: &str, steps: &[&str], bytes: bool) {
    let fixture = root.join(format!("{n}-f"));
    std::fs::create_dir_all(&fixture).unwrap();
    sh(&fixture, "bash", &["-ec", &format!("{POKE}{setup}")]);
    let dirs = [root.join(format!("{n}-o")), root.join(format!("{n}-t"))];
    for d in &dirs {
        copy_dir(&fixture, d);
    }
    let check = if bytes {
        FileCheck::Bytes
    } else {
        FileCheck::QemuViews
    };
    compare_runs(&dirs, n, steps, check);
}

/// 049: `create` reads sizes with every suffix (as the size argument and as
/// `-o size=`), refuses negative and wordy sizes, reads cluster sizes with
/// suffixes and fractions, and checks `compat`, `preallocation`,
/// `encryption` and `lazy_refcounts` (which needs compat 1.1) as qemu-img does.
#[test]
fn iotest_049_create_option_parsing_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let mut steps = Vec::new();
    let sizes = "1024 1024b 1k 1K 1M 1G 1T 1024.0 1024.0b 1.5k 1.5K 1.5M 1.5G 1.5T";
    for s in sizes.split(' ') {
        steps.push(format!("create -f qcow2 img {s}"));
        steps.push(format!("create -f qcow2 -o size={s} img"));
    }
    for s in ["-1024", "-1k", "1kilobyte", "foobar"] {
        steps.push(format!("create -f qcow2 img -- {s}"));
        steps.push(format!("create -f qcow2 -o size={s} img"));
    }
    for s in "1024 1024b 1k 1K 1M 1024.0 1024.0b 0.5k 0.5K 0.5M".split(' ') {
        steps.push(format!("create -f qcow2 -o cluster_size={s} img 64M"));
    }
    for o in [
        "compat=0.10",
        "compat=1.1",
        "compat=0.42",
        "compat=foobar",
        "preallocation=off",
        "preallocation=metadata",
        "preallocation=1234",
        "encryption=off",
        "encryption=on",
        "compat=1.1,lazy_refcounts=off",
        "compat=1.1,lazy_refcounts=on",
        "compat=0.10,lazy_refcounts=off",
        "compat=0.10,lazy_refcounts=on",
    ] {
        steps.push(format!("create -f qcow2 -o {o} img 64M"));
    }
    for (i, step) in steps.iter().enumerate() {
        same_files(dir.path(), &format!("c{i}"), "", &[step.as_str()], false);
    }
    assert_all_same();
}

/// 112: `refcount_bits` must be a power of two from 1 to 64 (16 for compat
/// 0.10), read as QEMU reads number options (a sign, hex and octal, negative
/// numbers wrapping, too large ones refused), and shown in the "Formatting"
/// line as the number it was read as.
#[test]
fn iotest_112_refcount_bits_limits_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let opts = [
        "refcount_bits=0",
        "refcount_bits=-1",
        "refcount_bits=128",
        "refcount_bits=42",
        "refcount_bits=1",
        "refcount_bits=64",
        "refcount_bits=0x10",
        "refcount_bits=010",
        "refcount_bits=+16",
        "refcount_bits=-0x10",
        "refcount_bits=99999999999999999999",
        "refcount_bits=16k",
        "refcount_bits=",
        "compat=0.10,refcount_bits=16",
        "compat=0.10,refcount_bits=1",
        "compat=0.10,refcount_bits=64",
    ];
    for (i, o) in opts.iter().enumerate() {
        let create = format!("create -f qcow2 -o {o} img 64M");
        same_files(
            dir.path(),
            &format!("r{i}"),
            "",
            &[create.as_str(), "info img"],
            false,
        );
    }
    assert_all_same();
}

/// 112: snapshots on narrow refcounts (a 1-bit refcount cannot take a second
/// reference, a 2-bit one a fourth), compressed clusters on 1-bit refcounts,
/// a 64-bit refcount at its maximum, amending the width down and up and to
/// compat 0.10, with a snapshot in the image, and `check -r all` of a cluster
/// referenced twice under 1-bit refcounts.
#[test]
fn iotest_112_snapshots_and_amend_on_refcount_widths_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mk = |bits: &str| format!("qemu-img create -q -f qcow2 -o refcount_bits={bits} img 64M\n");
    same_after(
        d,
        "snap1",
        &format!("{}qemu-io -c 'write 0 512' img >/dev/null", mk("1")),
        &["snapshot -c foo img", "check img", "snapshot -l img"],
        false,
    );
    same_after(
        d,
        "snap2",
        &format!("{}qemu-io -c 'write 0 512' img >/dev/null", mk("2")),
        &[
            "snapshot -c foo img",
            "snapshot -c bar img",
            "snapshot -c baz img",
            "check img",
        ],
        false,
    );
    same_after(
        d,
        "compressed1",
        &format!(
            "{}qemu-io -c 'write -P 0 -c 0 64k' -c 'write -P 1 -c 64k 64k' img >/dev/null",
            mk("1")
        ),
        &["check img"],
        true,
    );
    for (n, refcount) in [
        ("msb64", "\\x80\\x00\\x00\\x00\\x00\\x00\\x00\\x00"),
        ("max64", "\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff"),
    ] {
        same_after(
            d,
            n,
            &format!(
                "{}qemu-io -c 'write 0 512' img >/dev/null
                 poke img $((0x20028)) '{refcount}'
                 poke img $((0x40000)) '\\x00\\x00\\x00\\x00\\x00\\x05\\x00\\x00'",
                mk("64")
            ),
            &["check img", "snapshot -c foo img", "check img"],
            false,
        );
    }
    same_after(
        d,
        "amend",
        "qemu-img create -q -f qcow2 img 64M
         qemu-io -c 'write 16M 32M' img >/dev/null",
        &[
            "amend -o refcount_bits=1 img",
            "check img",
            "amend -o refcount_bits=64 img",
            "check img",
            "amend -o compat=0.10 img",
            "amend -o compat=0.10,refcount_bits=16 img",
            "check img",
            "amend -o compat=1.1 img",
            "amend -o refcount_bits=32,compat=0.10 img",
            "amend -o refcount_bits=0x20 img",
            "amend -o refcount_bits=-1 img",
            "info img",
        ],
        true,
    );
    same_after(
        d,
        "amend-snapshot",
        "qemu-img create -q -f qcow2 img 64M
         qemu-io -c 'write 16M 32M' img >/dev/null
         qemu-img snapshot -c foo img
         qemu-io -c 'write 0 16M' img >/dev/null",
        &[
            "amend -o refcount_bits=1 img",
            "check img",
            "amend -o refcount_bits=2 img",
            "check img",
        ],
        true,
    );
    same_after(
        d,
        "two-references",
        &format!(
            "{}qemu-io -c 'write 0 64k' img >/dev/null
             poke img $((0x40008)) '\\x80\\x00\\x00\\x00\\x00\\x05\\x00\\x00'",
            mk("1")
        ),
        &[
            "check -r all img",
            "amend -o refcount_bits=2 img",
            "check -r all img",
        ],
        true,
    );
    assert_all_same();
}

/// 042: every command on a zero-sized image: convert (plain and compressed),
/// rebase (unsafe and safe), check, info, map, compare, measure, dd.
#[test]
fn iotest_042_zero_sized_images_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_after(
        dir.path(),
        "zero",
        "qemu-img create -q -f qcow2 orig 0",
        &[
            "check orig",
            "convert -O qcow2 orig img",
            "check img",
            "convert -c -O qcow2 orig img",
            "check img",
            "rebase -u -b orig -F qcow2 img",
            "rebase -b orig -F qcow2 img",
            "check img",
            "info img",
            "map img",
            "compare orig img",
            "measure -O qcow2 orig",
            "convert -O raw orig raw",
            "dd if=orig of=dd bs=1",
        ],
        true,
    );
    assert_all_same();
}

/// 053: a one-sector image converted compressed keeps its size and data, and
/// the file ends on a sector boundary as qemu-img leaves it; so does a
/// compressed image of a whole cluster.
#[test]
fn iotest_053_compressed_convert_of_a_partial_cluster_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for (n, size) in [("sector", "512"), ("odd", "1000"), ("cluster", "64k")] {
        same_after(
            dir.path(),
            n,
            &format!(
                "qemu-img create -q -f qcow2 orig {size}
                 qemu-io -c 'write -P0xa 0 512' orig >/dev/null"
            ),
            &[
                "convert -c -O qcow2 orig img",
                "check img",
                "info img",
                "compare orig img",
            ],
            true,
        );
    }
    assert_all_same();
}

/// 079: metadata preallocation of a 4 GiB image with every cluster size from
/// 16 KiB to 4 MiB.
#[test]
fn iotest_079_metadata_preallocation_with_each_cluster_size_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for s in [
        16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304,
    ] {
        let create = format!("create -f qcow2 -o preallocation=metadata,cluster_size={s} img 4G");
        same_files(
            dir.path(),
            &format!("c{s}"),
            "",
            &[create.as_str(), "check img"],
            false,
        );
    }
    assert_all_same();
}

/// 054 (an image of 1 EiB is refused; a header claiming it is read), 111 (a
/// backing file that does not exist, with and without a size), 102 (the map
/// of an image whose data cluster was cut off the file's end).
#[test]
fn iotests_054_111_102_huge_missing_and_truncated_images_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    same_after(d, "054", "", &["create -f qcow2 img 1048576T"], true);
    same_after(
        d,
        "054-header",
        "qemu-img create -q -f qcow2 img 4G
         poke img 24 '\\x10\\x00\\x00\\x00\\x00\\x00\\x00\\x00'",
        &["check img", "info img"],
        true,
    );
    same_after(
        d,
        "111",
        "",
        &[
            "create -f qcow2 -b img.inexistent img",
            "create -f qcow2 -b img.inexistent -F qcow2 img",
            "create -f qcow2 -b img.inexistent -F qcow2 img 64M",
        ],
        true,
    );
    same_after(
        d,
        "102",
        "qemu-img create -q -f qcow2 img 64K
         qemu-io -c 'write 0 64k' img >/dev/null",
        &[
            "resize -f raw --shrink img 327680",
            "map img",
            "map --output=json img",
            "check img",
            "convert -O raw img out",
            "compare img out",
        ],
        true,
    );
    assert_all_same();
}

/// 159: `dd` with block sizes that do and do not divide the image, then
/// check and compare of the copy.
#[test]
fn iotest_159_dd_block_sizes_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for bs in ["5", "512", "1024", "1999", "1K", "64K", "1M"] {
        let dd = format!("dd if=img of=out bs={bs} -O qcow2");
        same_after(
            dir.path(),
            &format!("bs{bs}"),
            "qemu-img create -q -f qcow2 img 1M
             qemu-io -c 'write -P 0xa 0 1M' img >/dev/null",
            &[dd.as_str(), "check out", "compare img out"],
            true,
        );
    }
    assert_all_same();
}

/// 050 (a safe rebase onto a new base keeps zero clusters reading as zeroes)
/// and 063 (`convert -n` needs the target to exist and be large enough, and
/// round-trips through raw).
#[test]
fn iotests_050_063_rebase_over_zeroes_and_convert_into_existing_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    same_after(
        d,
        "050",
        "qemu-img create -q -f qcow2 img.old 10M
         qemu-io -c 'write -P 0x40 0 1M' img.old >/dev/null
         qemu-img create -q -f qcow2 img.new 10M
         qemu-io -c 'write -P 0x5a 0 1M' img.new >/dev/null
         qemu-img create -q -f qcow2 -b img.old -F qcow2 img 10M
         qemu-io -c 'write -z 0 1M' img >/dev/null",
        &["rebase -b img.new -F qcow2 img"],
        true,
    );
    same_after(
        d,
        "063",
        "qemu-img create -q -f qcow2 img 4M
         qemu-io -c 'write -P 1 0 1M' -c 'write -z 2M 1M' img >/dev/null
         cp img img.orig
         qemu-img create -q -f qcow2 small 2M",
        &[
            "convert -f qcow2 -O qcow2 -n img nofile",
            "convert -f qcow2 -O qcow2 -n img img.orig",
            "convert -f qcow2 -O raw img img.raw1",
            "convert -f qcow2 -O raw img.orig img.raw2",
            "convert -f raw -O qcow2 -n img.raw2 img",
            "check img",
            "convert -f qcow2 -O qcow2 -n img small",
        ],
        true,
    );
    same_after(
        d,
        "063-raw",
        "truncate -s 4M img
         truncate -s 2M small",
        &[
            "convert -f raw -O raw -n img nofile",
            "convert -f raw -O raw -n img small",
        ],
        true,
    );
    assert_all_same();
}

/// 080: header fields a hostile file carries (header size, extension sizes,
/// refcount table size and offset, snapshot count and offset, L1 size and
/// offset, backing file name size), each seen through `info`, `check`,
/// `snapshot -l` and `map`.
#[test]
fn iotest_080_hostile_header_fields_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("hdr-huge", "poke img 100 '\\xff\\xff\\xff\\xff'"),
        ("hdr-big", "poke img 100 '\\x7f\\xff\\xff\\xff'"),
        (
            "ext-huge-backing",
            "poke img 8 '\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff'
             poke img 104 '\\x12\\x34\\x56\\x78'
             poke img 108 '\\x7f\\xff\\xff\\xff'",
        ),
        (
            "ext-huge-backing-inside",
            "poke img 8 '\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x6c'
             poke img 104 '\\x12\\x34\\x56\\x78'
             poke img 108 '\\x7f\\xff\\xff\\xff'",
        ),
        (
            "ext-huge",
            "poke img 104 '\\x12\\x34\\x56\\x78'
             poke img 108 '\\x7f\\xff\\xff\\xff'",
        ),
        ("reftable-huge", "poke img 56 '\\xff\\xff\\xff\\xff'"),
        ("reftable-big", "poke img 56 '\\x00\\x02\\x00\\x01'"),
        (
            "reftable-misaligned",
            "poke img 48 '\\x12\\x34\\x56\\x78\\x90\\xab\\xcd\\xef'",
        ),
        (
            "reftable-offset-huge",
            "poke img 48 '\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\x00'
             poke img 56 '\\x00\\x00\\x00\\x7f'",
        ),
        ("snapshots-huge", "poke img 60 '\\xff\\xff\\xff\\xff'"),
        ("snapshots-big", "poke img 60 '\\x7f\\xff\\xff\\xff'"),
        (
            "snapshots-offset-huge",
            "poke img 64 '\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\x00'
             poke img 60 '\\x00\\x00\\xff\\xff'",
        ),
        (
            "snapshots-offset-misaligned",
            "poke img 64 '\\x12\\x34\\x56\\x78\\x90\\xab\\xcd\\xef'",
        ),
        ("l1-huge", "poke img 36 '\\xff\\xff\\xff\\xff'"),
        ("l1-big", "poke img 36 '\\x7f\\xff\\xff\\xff'"),
        (
            "l1-offset-huge",
            "poke img 40 '\\x7f\\xff\\xff\\xff\\xff\\xff\\x00\\x00'
             poke img 36 '\\x00\\x00\\xff\\xff'",
        ),
        (
            "l1-offset-misaligned",
            "poke img 40 '\\x12\\x34\\x56\\x78\\x90\\xab\\xcd\\xef'
             poke img 36 '\\x00\\x00\\x00\\x01'",
        ),
        (
            "l1-empty-with-snapshot",
            "qemu-img snapshot -c foo img
             poke img 36 '\\x00\\x00\\x00\\x00'",
        ),
        (
            "backing-name-huge",
            "poke img 8 '\\x00\\x00\\x00\\x00\\x00\\x00\\x10\\x00'
             poke img 16 '\\xff\\xff\\xff\\xff'",
        ),
    ];
    for (n, poke) in cases {
        same_after(
            dir.path(),
            n,
            &format!("qemu-img create -q -f qcow2 img 64M\n{poke}"),
            &["info img", "check img", "snapshot -l img", "map img"],
            true,
        );
    }
    assert_all_same();
}

/// 061: `amend` between compat levels (zero clusters of a version 3 image
/// written out for version 2, lazy refcounts switched on and off), of an
/// overlay (its size shrunk and grown again: a version 2 overlay cannot hide
/// its longer backing file, a version 3 one zeroes the range it grows over),
/// and the options amend cannot change, refused in qemu-img's words.
#[test]
fn iotest_061_amend_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    same_after(
        d,
        "downgrade",
        "qemu-img create -q -f qcow2 -o compat=1.1 img 64M
         qemu-io -c 'write -P 0x2a 0 128k' -c 'write -z 256k 64k' img >/dev/null",
        &["amend -o compat=0.10 img", "check img"],
        true,
    );
    same_after(
        d,
        "upgrade",
        "qemu-img create -q -f qcow2 -o compat=0.10 img 64M
         qemu-io -c 'write -P 0x2a 0 128k' img >/dev/null",
        &[
            "amend -o compat=1.1 img",
            "amend -o lazy_refcounts=on img",
            "amend -o lazy_refcounts=off img",
            "check img",
        ],
        true,
    );
    same_after(
        d,
        "downgrade-snapshot",
        "qemu-img create -q -f qcow2 -o compat=1.1 img 64M
         qemu-img snapshot -c foo img
         qemu-io -c 'write -z 0 128k' img >/dev/null",
        &["amend -o compat=0.10 img", "check img"],
        true,
    );
    same_after(
        d,
        "overlay-v2",
        "qemu-img create -q -f qcow2 base 64M
         qemu-io -c 'write -P 1 0 64k' base >/dev/null
         qemu-img create -q -f qcow2 -b base -F qcow2 img 64M
         qemu-io -c 'write -z 0 64k' img >/dev/null",
        &[
            "amend -o compat=0.10 img",
            "amend -o size=32M img",
            "amend -o size=128M img",
            "info img",
            "amend -o backing_file=x img",
            "amend -o backing_fmt=raw img",
            "amend -o foo=bar img",
            "amend -o compat=2 img",
            "amend -o cluster_size=4k img",
            "amend -o encryption=on img",
            "amend -o preallocation=full img",
        ],
        true,
    );
    same_after(
        d,
        "overlay-grows-under-backing",
        "qemu-img create -q -f qcow2 base 64M
         qemu-io -c 'write -P 1 0 64M' base >/dev/null
         qemu-img create -q -f qcow2 -b base -F qcow2 img 32M",
        &["amend -o size=64M img", "compare base img"],
        true,
    );
    same_after(
        d,
        "data-file",
        "qemu-img create -q -f qcow2 -o compat=1.1 img 64M
         qemu-io -c 'write -P 0x2a 0 128k' img >/dev/null",
        &[
            "amend -o data_file=foo img",
            "amend -o data_file_raw=on img",
            "info img",
        ],
        true,
    );
    assert_all_same();
}

/// 122: `convert` of an image with data, zero clusters, written zeroes and
/// partly written clusters: plain, with -S, compressed (also with -S 0) and
/// into other cluster sizes.
#[test]
fn iotest_122_convert_sparseness_and_compression_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_after(
        dir.path(),
        "122",
        "qemu-img create -q -f qcow2 -o cluster_size=4k img 64M
         qemu-io -c 'write -P 1 0 8k' -c 'write -z 8k 8k' -c 'write -P 0 16k 4k' \
                 -c 'write -P 2 1M 1k' -c 'write -P 3 2M 64k' img >/dev/null",
        &[
            "convert -O qcow2 img o1",
            "convert -S 0 -O qcow2 img o2",
            "convert -S 4k -O qcow2 img o3",
            "convert -c -O qcow2 img o5",
            "convert -c -S 0 -O qcow2 img o6",
            "convert -O qcow2 -o cluster_size=1M img o7",
            "convert -S 512 -O qcow2 -o cluster_size=512 img o9",
        ],
        true,
    );
    assert_all_same();
}

/// 126 (file names with a colon, plain, as `./` paths and through `file:`),
/// 138 (a compressed cluster whose refcount was lost, checked and repaired),
/// 154 (an overlay with zero and discarded ranges over its backing file,
/// mapped before and after it grows).
#[test]
fn iotests_126_138_154_names_compressed_refcounts_and_zero_ranges_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    same_after(
        d,
        "126",
        "",
        &[
            "create -f qcow2 image:colon.qcow2 1M",
            "create -f qcow2 ./image:colon.qcow2 1M",
            "create -f qcow2 file:image:colon.qcow2 1M",
            "info ./image:colon.qcow2",
            "create -f qcow2 -b ./image:colon.qcow2 -F qcow2 over 1M",
            "info over",
        ],
        true,
    );
    same_after(
        d,
        "138",
        "qemu-img create -q -f qcow2 img 1M
         qemu-io -c 'write -c 0 64k' img >/dev/null
         poke img $((0x50000 + 8)) '\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00'",
        &["check img", "check -r all img", "check img"],
        true,
    );
    same_after(
        d,
        "154",
        "qemu-img create -q -f qcow2 base 128k
         qemu-img create -q -f qcow2 -b base -F qcow2 img 128k
         qemu-io -c 'write -P 1 0 128k' base >/dev/null
         qemu-io -c 'write -z 32k 4k' -c 'discard 64k 64k' img >/dev/null",
        &[
            "map --output=json img",
            "resize img 192k",
            "map --output=json img",
        ],
        true,
    );
    assert_all_same();
}
