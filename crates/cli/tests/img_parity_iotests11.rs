//! What QEMU's iotests 042, 112, 122, 190, 217 and 274 still ran through
//! qemu-img in shapes no other test pins, and corners of the command line
//! near them: committing a zero-sized overlay and one longer than its base,
//! `convert -S 8k` and compression into 1 KiB clusters, widening 1-bit
//! refcounts at 512-byte clusters, deleting a snapshot when blkdebug fails
//! the freeing of its clusters, resizing past a bitmap's size limit,
//! shrinking to a partial cluster, backing formats strata does not read,
//! empty image names and vsock NBD addresses. Each tool runs the same
//! command on its own copy of files qemu-img and qemu-io made; both must
//! print the same and leave the same bytes (or, where noted, images alike
//! to QEMU).

mod common;

use common::node::same_but_node;
use common::{assert_all_same, differs, outcome, same_files, same_image, same_on_copies, sh};

/// 042: committing an overlay of a zero-sized image into its zero-sized
/// base; qemu-img lays the emptied overlay out anew (its L1 table, empty,
/// is named after the header, the refcount table and one refcount block).
#[test]
fn commit_of_a_zero_sized_overlay_leaves_the_bytes_qemu_img_leaves() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "zero",
        "qemu-img create -q -f qcow2 base 0
         qemu-img create -q -f qcow2 -b base -F qcow2 top 0",
        &["commit top", "check top", "info top", "map top"],
        false,
    );
    assert_all_same();
}

/// 274: committing a top longer than its (shorter) backing file, which
/// grows to the top's size, and the top emptied as qemu-img empties it.
#[test]
fn commit_of_a_top_longer_than_its_base_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "short-mid",
        "qemu-img create -q -f qcow2 base 2M
         qemu-img create -q -f qcow2 -b base -F qcow2 mid 1M
         qemu-img create -q -f qcow2 -b mid -F qcow2 top 2M
         qemu-io -c 'write -P 1 0 2M' base >/dev/null",
        &[
            "map --output=json top",
            "commit top",
            "info mid",
            "map --output=json mid",
            "map --output=json top",
        ],
        false,
    );
    assert_all_same();
}

/// The image 122 converts: data, zero clusters, written zeroes and partly
/// written clusters, at 4 KiB clusters.
const IMG_122: &str = "qemu-img create -q -f qcow2 -o cluster_size=4k img 64M
     qemu-io -c 'write -P 1 0 8k' -c 'write -z 8k 8k' -c 'write -P 0 16k 4k' \
             -c 'write -P 2 1M 1k' -c 'write -P 3 2M 64k' img >/dev/null";

/// 122: `convert -S 8k` (zeroes found only in whole 8 KiB runs) leaves the
/// same bytes and the same map.
#[test]
fn convert_with_8k_sparseness_maps_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "122-s8k",
        IMG_122,
        &["convert -S 8k -O qcow2 img o4", "map --output=json o4"],
        false,
    );
    assert_all_same();
}

/// 122: `convert -c` into 1 KiB clusters gives qemu-img's image: the same
/// info, map and data, and the same bytes (strata deflates with the system
/// zlib QEMU links, at QEMU's level and window, so each compressed cluster
/// has qemu-img's size and is packed where qemu-img packs it).
#[test]
fn convert_compressed_into_1k_clusters_is_qemu_imgs_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(d, "bash", &["-ec", IMG_122]);
    let run = |prog: &str, out: &str| {
        let (code, o, e) = outcome(
            d,
            prog,
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=1k",
                "img",
                out,
            ],
        );
        (code, o, e.replace(out, "OUT"))
    };
    let (ours, theirs) = (run("strata", "o8"), run("qemu-img", "t8"));
    if ours != theirs {
        differs(format!(
            "convert -c 1k\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
        ));
    }
    same_image(d, "o8", "t8", "convert -c into 1k clusters");
    let map = |f: &str| outcome(d, "qemu-img", &["map", "--output=json", f]).1;
    if map("o8").replace("o8", "X") != map("t8").replace("t8", "X") {
        differs("convert -c into 1k clusters: maps differ".into());
    }
    if std::fs::read(d.join("o8")).unwrap() != std::fs::read(d.join("t8")).unwrap() {
        differs("convert -c into 1k clusters: the files' bytes differ".into());
    }
    assert_all_same();
}

/// 112: widening 1-bit refcounts to 64 bits at 512-byte clusters, where the
/// first new refcount block has one free entry left for itself and the new
/// table needs a block of its own: the new structures land where qemu-img's
/// walks put them, and the progress goes back as theirs does (a fourth walk).
/// Then narrowing and widening again, and other widths and cluster sizes.
#[test]
fn amend_refcount_width_at_512_byte_clusters_places_structures_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "walks",
        "qemu-img create -q -f qcow2 -o refcount_bits=1,cluster_size=512 img 64k
         qemu-io -c 'write 0 29696' img >/dev/null",
        &[
            "amend -o refcount_bits=64 -p img",
            "check img",
            "amend -o refcount_bits=2 img",
            "check img",
            "amend -o refcount_bits=16 img",
            "check img",
        ],
        false,
    );
    for (n, create, bits) in [
        ("c512-16-1", "cluster_size=512", "1"),
        ("c512-16-64", "cluster_size=512", "64"),
        ("c4k-16-8", "cluster_size=4k", "8"),
        ("c64k-16-64", "cluster_size=64k", "64"),
        ("c64k-16-1", "cluster_size=64k", "1"),
    ] {
        same_files(
            dir.path(),
            n,
            &format!(
                "qemu-img create -q -f qcow2 -o {create} img 8M
                 qemu-io -c 'write 0 1M' -c 'write 3M 512k' img >/dev/null"
            ),
            &[
                &format!("amend -o refcount_bits={bits} -p img"),
                "check img",
            ],
            false,
        );
    }
    assert_all_same();
}

/// 190: growing an image past the size its finest bitmaps can describe is
/// not refused: the image grows, no bitmap is stored again (all stay marked
/// in use, the old tables kept), and qemu-img warns when it closes the
/// image, naming the last bitmap too large (it tries them newest first).
#[test]
fn resize_past_a_bitmaps_size_limit_leaves_them_in_use_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_but_node(
        dir.path(),
        "lost",
        "qemu-img create -q -f qcow2 -o cluster_size=2M img 2T
         qemu-img bitmap --add -g 512 img b1
         qemu-img bitmap --add -g 1k img b2
         qemu-img bitmap --add -g 2M img b3",
        &["resize img 8T", "info img", "check img"],
        "node '",
    );
    same_but_node(
        dir.path(),
        "one",
        "qemu-img create -q -f qcow2 -o cluster_size=2M img 1T
         qemu-img bitmap --add -g 512 img b1
         qemu-img bitmap --add -g 2M img b2",
        &["resize -q img 3T", "info img"],
        "node '",
    );
    assert_all_same();
}

/// 217: deleting a snapshot when blkdebug fails every request from the
/// first freeing of clusters on (`cluster_free`): the snapshot is gone, the
/// clusters it held leak, and `check -r leaks` repairs them.
#[test]
fn snapshot_delete_with_cluster_free_failing_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    same_files(
        dir.path(),
        "217",
        "qemu-img create -q -f qcow2 img 64M
         qemu-io -c 'write 0 64k' img >/dev/null
         printf '[inject-error]\\nevent = \"cluster_free\"\\nerrno = \"5\"\\n' > conf",
        &[
            "snapshot -d foo blkdebug:conf:img",
            "snapshot -l img",
            "check img",
            "check -r leaks img",
        ],
        false,
    );
    assert_all_same();
}

/// Shrinking a qcow2 image to a size inside a cluster: the guest sees the
/// same disk as qemu-img leaves. (qemu-img keeps the old bytes past the new
/// end in the last cluster, and growing the image again shows them; strata
/// zeroes them, so the grown range reads as zeroes.)
#[test]
fn resize_shrink_into_a_cluster_reads_the_same_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        "bash",
        &[
            "-ec",
            "qemu-img create -q -f qcow2 img 1M
             qemu-io -c 'write -P 0xaa 0 1M' img >/dev/null",
        ],
    );
    for (n, size) in [(0, "100352"), (1, "1000448"), (2, "512")] {
        let (ours, theirs) = same_on_copies(d, n, "img", "resize", &["--shrink"], &[size]);
        same_image(d, &ours, &theirs, &format!("resize --shrink {size}"));
    }
    assert_all_same();
}

/// `create -F FMT -b FILE` for formats strata does not read: each QEMU
/// driver refuses a file not in its format in its own words (a qcow2 file,
/// a raw one, a short one, an empty one); `-F file` takes any file as raw.
#[test]
fn create_over_a_backing_file_in_a_foreign_format_is_refused_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let mut steps = Vec::new();
    for fmt in [
        "vmdk",
        "vdi",
        "vpc",
        "dmg",
        "vhdx",
        "qed",
        "parallels",
        "bochs",
        "cloop",
        "qcow",
        "nbd",
        "file",
    ] {
        for b in ["q", "r", "s", "e"] {
            steps.push(format!("create -f qcow2 -F {fmt} -b {b} img"));
        }
    }
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    same_files(
        dir.path(),
        "foreign",
        "qemu-img create -q -f qcow2 q 1M
         qemu-img create -q -f raw r 1M
         printf 'short' > s
         : > e",
        &steps,
        false,
    );
    assert_all_same();
}

/// An empty image name, plain or as an empty `--image-opts` list, is opened
/// and refused as qemu-img refuses it, by every subcommand that opens one.
#[test]
fn empty_image_names_are_refused_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("x"), b"").unwrap();
    let cases: [&[&str]; 22] = [
        &["info", ""],
        &["info", "--image-opts", ""],
        &["info", "-f", "qcow2", ""],
        &["info", "-f", "raw", ""],
        &["info", "-f", "host_device", ""],
        &["info", "--image-opts", "driver=file,filename="],
        &["info", "--image-opts", "driver=host_device,filename="],
        &["check", ""],
        &["check", "--image-opts", ""],
        &["map", "--image-opts", ""],
        &["convert", "--image-opts", "", "x"],
        &["convert", "-O", "qcow2", "", "out"],
        &["compare", "--image-opts", "", ""],
        &["compare", "", ""],
        &["resize", "--image-opts", "", "1M"],
        &["snapshot", "-l", "--image-opts", ""],
        &["commit", "--image-opts", ""],
        &["amend", "-o", "size=1M", "--image-opts", ""],
        &["rebase", "-u", "-b", "", "--image-opts", ""],
        &["measure", "-O", "qcow2", "--image-opts", ""],
        &["measure", "-O", "qcow2", ""],
        &["bitmap", "--add", "--image-opts", "", "b"],
    ];
    for args in cases {
        common::same(d, args);
    }
    assert_all_same();
}

/// NBD over vsock (`server.type=vsock`): missing and unexpected members,
/// numbers QEMU cannot read, and a context no one listens at, refused in
/// qemu-img's words.
#[test]
fn vsock_nbd_addresses_are_refused_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for o in [
        "",
        ",server.port=1",
        ",server.cid=3",
        ",server.cid=x,server.port=1",
        ",server.cid=3,server.port=x",
        ",server.cid=-1,server.port=1",
        ",server.cid=99999999999,server.port=1",
        ",server.cid=3,server.port=1,server.host=a",
        ",server.cid=3,server.port=1",
        ",server.cid=+3,server.port=1",
    ] {
        let opts = format!("driver=nbd,server.type=vsock{o}");
        common::same(d, &["info", "--image-opts", &opts]);
    }
    common::same(
        d,
        &[
            "info",
            r#"json:{"driver":"nbd","server":{"type":"vsock","cid":"3","port":"10809"}}"#,
        ],
    );
    assert_all_same();
}
