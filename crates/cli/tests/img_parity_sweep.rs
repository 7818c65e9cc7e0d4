//! Usages of qemu-img as its documentation and scripts write them, swept
//! subcommand by subcommand over small images of each kind (raw of odd sizes,
//! qcow2 v2 and v3 with zero and compressed clusters, a backing chain,
//! extended L2, 512-byte and 2 MiB clusters, internal
//! snapshots). One row per usage: both tools run it in their own copy of the
//! same directory and must print the same bytes, exit alike and leave files
//! QEMU reads alike.

mod common;

use common::{assert_all_same, io, qcow2, same_in_dir_copies, sh};
use std::path::Path;

/// The images every row may name, made with QEMU's own tools in `dir`.
fn fixture(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    sh(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "raw", "raw.img", "4M"],
    );
    io(
        dir,
        "raw",
        "raw.img",
        &["write -P 0x11 0 64k", "write -P 0x22 1M 4k"],
    );
    qcow2(dir, "v2.qcow2", "4M", &["-o", "compat=0.10"]);
    io(
        dir,
        "qcow2",
        "v2.qcow2",
        &["write -P 0x11 0 64k", "write -z 1M 64k"],
    );
    qcow2(dir, "v3.qcow2", "4M", &[]);
    io(
        dir,
        "qcow2",
        "v3.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -z 1M 64k",
            "write -c -P 0x33 2M 64k",
            "write -P 0 3M 4k",
        ],
    );
    qcow2(dir, "base.qcow2", "4M", &[]);
    io(dir, "qcow2", "base.qcow2", &["write -P 0xaa 0 2M"]);
    qcow2(dir, "ov.qcow2", "4M", &["-b", "base.qcow2", "-F", "qcow2"]);
    io(dir, "qcow2", "ov.qcow2", &["write -P 0xbb 512k 64k"]);
    qcow2(dir, "el2.qcow2", "4M", &["-o", "extended_l2=on"]);
    io(
        dir,
        "qcow2",
        "el2.qcow2",
        &["write -P 0x11 0 4k", "write -z 64k 8k"],
    );
    qcow2(dir, "c512.qcow2", "1M", &["-o", "cluster_size=512"]);
    io(dir, "qcow2", "c512.qcow2", &["write -P 0x11 0 10k"]);
    qcow2(dir, "c2m.qcow2", "8M", &["-o", "cluster_size=2M"]);
    io(dir, "qcow2", "c2m.qcow2", &["write -P 0x11 0 10k"]);
    for size in [1usize, 511, 513] {
        std::fs::write(dir.join(format!("r{size}.img")), vec![0x5a; size]).unwrap();
    }
}

/// `check -q` prints nothing in either output format: qemu-img's JSON report
/// goes through the same quiet-aware printer as its text.
const CHECK: &[&[&str]] = &[
    &["check", "-q", "--output=json", "v3.qcow2"],
    &["check", "-q", "--output=json", "v2.qcow2"],
    &["check", "-q", "--output=json", "ov.qcow2"],
    &["check", "-q", "--output=json", "el2.qcow2"],
    &["check", "-q", "--output=json", "-r", "all", "c512.qcow2"],
    &["check", "-q", "--output=human", "c2m.qcow2"],
    &["check", "--output=json", "v3.qcow2"],
    &["check", "-r", "leaks", "v3.qcow2"],
    &["check", "-T", "none", "v2.qcow2"],
    // A format without checks is opened first: a missing file is named.
    &["check", "-f", "raw", "nonexist.img"],
    &["check", "-f", "raw", "-r", "all", "nonexist.img"],
    &["check", "-f", "raw", "raw.img"],
    &["check", "-q", "r511.img"],
];

/// measure names the formats QEMU knows but strata does not write as qemu-img
/// refuses them, after opening the source.
const MEASURE: &[&[&str]] = &[
    &["measure", "-O", "vmdk", "raw.img"],
    &["measure", "-O", "vpc", "--size", "1G"],
    &["measure", "-O", "qed", "v3.qcow2"],
    &["measure", "-O", "file", "raw.img"],
    &["measure", "-O", "bochs", "raw.img"],
    &["measure", "-O", "throttle", "--size", "1G"],
    &["measure", "-O", "bogus", "raw.img"],
    &["measure", "-O", "vmdk", "nonexist.img"],
    &["measure", "-O", "bogus", "nonexist.img"],
    &["measure", "-O", "qcow2", "raw.img"],
    &["measure", "-O", "qcow2", "--size", "1.5G"],
    &["measure", "-O", "qcow2", "--size", "16E"],
    &["measure", "--output=json", "-O", "qcow2", "ov.qcow2"],
];

/// Common read-only usages that already agree, kept so they stay so.
const READS: &[&[&str]] = &[
    &["info", "--backing-chain", "--output=json", "ov.qcow2"],
    &["info", "-U", "el2.qcow2"],
    &["info", "r513.img"],
    &[
        "map",
        "--output=json",
        "--start-offset=1M",
        "--max-length=64k",
        "v3.qcow2",
    ],
    &["map", "--max-length=0", "ov.qcow2"],
    &["compare", "-s", "v3.qcow2", "v2.qcow2"],
    &["compare", "-q", "r1.img", "r511.img"],
];

#[test]
fn swept_usages_match_qemu_img() {
    let root = tempfile::tempdir().unwrap();
    let fx = root.path().join("fx");
    fixture(&fx);
    for (n, args) in CHECK.iter().chain(MEASURE).chain(READS).enumerate() {
        same_in_dir_copies(&fx, n, args);
    }
    assert_all_same();
}
