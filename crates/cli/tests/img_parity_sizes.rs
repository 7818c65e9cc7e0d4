//! Sizes are read as qemu-img reads them: every form its size parser accepts
//! (hexadecimal, suffixes in either case, b/B, fractions, a leading sign or
//! white space) and refuses (negative, too large, trailing text, empty, an
//! exponent), as an image size, as `-o` values and as resize's new size, give
//! the same output, messages and exit codes from both tools.

mod common;

use common::{assert_all_same, same, sh};

/// Size arguments qemu-img takes or refuses, each for its own reason.
const SIZES: &[&str] = &[
    "0x10000",
    "0X10000",
    "0x10000b",
    "+0x10",
    " 0x10",
    "0x1k",
    "0x",
    "0x1.5",
    "00x10",
    "0x1p3",
    "0x8000000000000000",
    "0xffffffffffffffffff",
    "1.5G",
    "1.5",
    "1.5k",
    "1.3k",
    "1.5b",
    "1.0b",
    "1.",
    "1.k",
    "5.M",
    ".5M",
    "0.0001k",
    "0.1",
    "1b",
    "1B",
    "0b",
    "1k",
    "1K",
    "1m",
    "1G",
    "1T",
    "1.5T",
    "8E",
    "16E",
    "2e",
    "1Q",
    "1kB",
    "-1",
    "-0",
    "-",
    "-1k",
    "-1.5G",
    " 1M",
    "\t1M",
    "1M ",
    "1 M",
    "+1M",
    "",
    "k",
    ".",
    "1e3",
    "1.5e3",
    "1_000",
    "1..5k",
    "inf",
    "9223372036854775808",
    "18446744073709551616",
    "99999999999999999999",
    "99999999999999999999k",
    "16384P",
];

/// Option values from 2^63 up: qemu-img's option parser takes them, prints them
/// as negative numbers in its summary and refuses them later; strata calls them
/// out of range at once. Left out of the `-o` cases.
const SIGNED_IN_QEMU: &[&str] = &["0x8000000000000000", "8E", "9223372036854775808"];

#[test]
fn sizes_are_read_and_refused_as_qemu_img_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "r.qcow2", "1M"],
    );
    for s in SIZES {
        same(d, &["create", "-f", "raw", "s.raw", "--", s]);
        same(d, &["create", "-f", "qcow2", "s.qcow2", "--", s]);
        if !SIGNED_IN_QEMU.contains(s) {
            let cs = format!("cluster_size={s}");
            same(d, &["create", "-f", "qcow2", "-o", &cs, "c.qcow2", "1M"]);
            let size = format!("size={s}");
            same(d, &["create", "-f", "qcow2", "-o", &size, "o.qcow2"]);
        }
        same(d, &["resize", "r.qcow2", "--", s]);
        same(d, &["measure", "-O", "qcow2", "--size", s]);
    }
    assert_all_same();
}

/// `create` with each preallocation mode leaves a file of qemu-img's length and
/// disk usage (what `info` reports as disk size), for qcow2 at several cluster
/// sizes and for raw, and prints the same.
#[test]
fn preallocated_images_take_the_room_qemu_img_gives_them() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&str, &str)] = &[
        ("qcow2", "preallocation=off,cluster_size=512"),
        ("qcow2", "preallocation=off,cluster_size=64k"),
        ("qcow2", "preallocation=off,cluster_size=2M"),
        ("qcow2", "preallocation=metadata,cluster_size=64k"),
        ("qcow2", "preallocation=metadata,cluster_size=2M"),
        ("qcow2", "preallocation=falloc,cluster_size=64k"),
        ("qcow2", "preallocation=full,cluster_size=64k"),
        ("qcow2", "preallocation=full,cluster_size=2M"),
        ("raw", "preallocation=off"),
        ("raw", "preallocation=falloc"),
        ("raw", "preallocation=full"),
    ];
    for (fmt, opts) in cases {
        let made = |prog: &str, name: &str| {
            let _ = std::fs::remove_file(d.join(name));
            let (code, out, err) =
                common::outcome(d, prog, &["create", "-f", fmt, "-o", opts, name, "10M"]);
            let meta = std::fs::metadata(d.join(name)).unwrap();
            (
                code,
                out.replace(name, "IMG"),
                err.replace(name, "IMG"),
                meta.len(),
                meta.blocks(),
            )
        };
        let (ours, theirs) = (made("strata", "o.img"), made("qemu-img", "t.img"));
        if ours != theirs {
            common::differs(format!(
                "create -f {fmt} -o {opts}: (exit, stdout, stderr, length, blocks)\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
            ));
        }
    }
    assert_all_same();
}
