//! Where `convert` leaves the data: the layouts qemu-img gives a target for
//! sparse sizes that do not fit its read requests (iotest 122's `-S`), and
//! for zeroes written into part of a cluster of a target with extended L2
//! entries (`-B`). Each tool runs the same command on its own copy of files
//! qemu-img and qemu-io made; both must print the same and leave the same
//! bytes and the same map.

mod common;

use common::{assert_all_same, same_files};

/// A source whose clusters hold zeroes written as data with a few data
/// sectors among them, at request-unaligned places, and its raw copy.
const SPARSE_SOURCE: &str = "qemu-img create -q -f qcow2 -o cluster_size=64k img 64M
     qemu-io -c 'write -P 0 0 8M' -c 'write 0 1k' -c 'write 3M 1k' \
             -c 'write 5M 8k' -c 'write 6000k 3k' -c 'write -P 0 9M 1M' \
             -c 'write 9500k 512' -c 'write 10M 100k' img >/dev/null
     qemu-img convert -O raw img raw";

/// 122: `-S` larger than qemu-img's 2 MiB read request (its minimum shrinks
/// to the request, while zeroes are aligned to the sparse size rounded down
/// to a power of two) and sizes that are no power of two: the data and zero
/// ranges land where qemu-img puts them.
#[test]
fn convert_sparse_sizes_past_a_request_lay_out_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let mut steps = Vec::new();
    for (i, (src, cs, s)) in [
        ("img", "64k", "4M"),
        ("img", "64k", "16M"),
        ("img", "4k", "3M"),
        ("img", "512", "4M"),
        ("img", "2M", "4M"),
        ("img", "64k", "12k"),
        ("raw", "64k", "4M"),
        ("raw", "4k", "3k"),
    ]
    .iter()
    .enumerate()
    {
        steps.push(format!(
            "convert -O qcow2 -o cluster_size={cs} -S {s} {src} out{i}"
        ));
    }
    steps.push("convert -O raw -S 4M img out.raw".into());
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    same_files(dir.path(), "sparse", SPARSE_SOURCE, &steps, false);

    // Status runs that start off the 2 MiB grid, at 4 KiB clusters.
    same_files(
        dir.path(),
        "unaligned",
        "qemu-img create -q -f qcow2 -o cluster_size=4k img 16M
         qemu-io -c 'write -P 0 100k 3M' -c 'write 100k 1k' -c 'write 1500k 4k' \
                 -c 'write 2200k 1k' -c 'write -P 0 5M 5M' -c 'write 9M 512' \
                 -c 'write 6000k 2k' img >/dev/null",
        &[
            "convert -O qcow2 -S 8k img a",
            "convert -O qcow2 -S 12k img b",
            "convert -O qcow2 -S 4M img c",
            "convert -O raw -S 16M img d",
        ],
        false,
    );
    assert_all_same();
}

/// `convert -B` into a target with extended L2 entries: a zeroed range that
/// covers whole subclusters of a cluster only in part becomes zero
/// subclusters (no data cluster), as qemu-img zeroes it.
#[test]
fn convert_b_zeroes_subclusters_of_an_extended_l2_target_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for (n, io) in [
        ("head", "-c 'write -z 0 2k'"),
        ("middle", "-c 'write -z 4k 6k' -c 'write -z 200k 8k'"),
        ("most", "-c 'write -z 0 62k'"),
    ] {
        same_files(
            dir.path(),
            n,
            &format!(
                "qemu-img create -q -f qcow2 -o extended_l2=on base 1M
                 qemu-io -c 'write -P 1 0 1M' base >/dev/null
                 qemu-img create -q -f qcow2 -o extended_l2=on -b base -F qcow2 top 1M
                 qemu-io {io} top >/dev/null"
            ),
            &[
                "convert -O qcow2 -o extended_l2=on -B base -F qcow2 top x",
                "map --output=json x",
                "check x",
            ],
            false,
        );
    }
    assert_all_same();
}
