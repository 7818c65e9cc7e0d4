//! `strata img convert` against the real qemu-img 10: every output reads back
//! identical through `qemu-img compare`, every qcow2 output passes `qemu-img check`,
//! and inputs QEMU made (compressed, zero clusters, subclusters, chains, snapshots)
//! convert correctly. Bad arguments fail like qemu-img's.

mod common;

use common::{ok, run, verify};
use std::path::Path;
use std::process::Output;

/// qemu-io commands on a qcow2 image.
fn io(dir: &Path, file: &str, cmds: &[&str]) {
    common::io(dir, "qcow2", file, cmds);
}

/// A chain base.qcow2 <- top.qcow2 with data, zeroes and a snapshot, plus a raw disk.
fn inputs(dir: &Path) {
    ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "24M"],
    );
    io(
        dir,
        "base.qcow2",
        &["write -P 1 0 3M", "write -P 2 9M 100k", "write -z 12M 1M"],
    );
    ok(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "32M",
        ],
    );
    io(
        dir,
        "top.qcow2",
        &["write -P 3 1M 1M", "write -z 2M 512k", "write -P 4 30M 4k"],
    );
    ok(dir, "qemu-img", &["snapshot", "-c", "snap", "top.qcow2"]);
    io(dir, "top.qcow2", &["write -P 5 0 64k"]);
    ok(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "flat.raw"],
    );
    // Compressible text next to random data, in a raw disk.
    let mut v = Vec::new();
    for i in 0..(4 << 20) / 32 {
        v.extend_from_slice(format!("strata text line {i:013}\n").as_bytes());
    }
    let mut x: u64 = 1;
    for _ in 0..(2 << 20) / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.resize(8 << 20, 0);
    std::fs::write(dir.join("text.raw"), v).unwrap();
}

#[test]
fn every_direction_and_cluster_size_reads_back_identical() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    inputs(d);
    ok(d, "strata", &["convert", "-O", "raw", "top.qcow2", "a.raw"]);
    verify(d, "top.qcow2", "a.raw");
    ok(
        d,
        "strata",
        &["convert", "-f", "raw", "-O", "qcow2", "flat.raw", "b.qcow2"],
    );
    verify(d, "flat.raw", "b.qcow2");
    for cs in ["512", "4k", "64k", "2M"] {
        for compat in ["0.10", "1.1"] {
            let out = format!("c-{cs}-{compat}.qcow2");
            let o = format!("cluster_size={cs},compat={compat}");
            ok(
                d,
                "strata",
                &["convert", "-O", "qcow2", "-o", &o, "top.qcow2", &out],
            );
            verify(d, "top.qcow2", &out);
        }
    }
    ok(
        d,
        "strata",
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "top.qcow2",
            "sub.qcow2",
        ],
    );
    verify(d, "top.qcow2", "sub.qcow2");
    // A flattened chain has no backing file.
    let info = ok(d, "qemu-img", &["info", "--output=json", "b.qcow2"]);
    assert!(!info.contains("backing-filename"), "{info}");
}

#[test]
fn compressed_output_is_compressed_and_readable_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    inputs(d);
    for ty in ["zlib", "zstd"] {
        let out = format!("{ty}.qcow2");
        let o = format!("compression_type={ty}");
        ok(
            d,
            "strata",
            &[
                "convert", "-c", "-O", "qcow2", "-o", &o, "-f", "raw", "text.raw", &out,
            ],
        );
        verify(d, "text.raw", &out);
        let map = ok(d, "qemu-img", &["map", "--output=json", &out]);
        assert!(
            map.contains("\"compressed\": true"),
            "{ty}: no compressed cluster:\n{map}"
        );
        let size = std::fs::metadata(d.join(&out)).unwrap().len();
        assert!(
            size < 4 << 20,
            "{ty}: 8 MiB of half text compressed to {size} bytes"
        );
        // And strata reads QEMU's compression back.
        let theirs = format!("q{ty}.qcow2");
        ok(
            d,
            "qemu-img",
            &[
                "convert", "-c", "-O", "qcow2", "-o", &o, "-f", "raw", "text.raw", &theirs,
            ],
        );
        ok(
            d,
            "strata",
            &["convert", "-O", "raw", &theirs, &format!("{ty}.raw")],
        );
        ok(d, "cmp", &["text.raw", &format!("{ty}.raw")]);
    }
}

#[test]
fn sparse_target_zero_backing_snapshot_and_concatenation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    inputs(d);
    // -S 0 writes every byte: the raw output is fully allocated.
    ok(
        d,
        "strata",
        &["convert", "-S", "0", "-O", "raw", "top.qcow2", "full.raw"],
    );
    verify(d, "top.qcow2", "full.raw");
    let map = ok(
        d,
        "qemu-img",
        &["map", "--output=json", "-f", "raw", "full.raw"],
    );
    assert!(!map.contains("\"zero\": true"), "{map}");
    // -n into an existing image, with and without --target-is-zero.
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "n.qcow2", "32M"],
    );
    io(d, "n.qcow2", &["write -P 9 0 32M"]);
    ok(
        d,
        "strata",
        &["convert", "-n", "-O", "qcow2", "top.qcow2", "n.qcow2"],
    );
    verify(d, "top.qcow2", "n.qcow2");
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "z.qcow2", "32M"],
    );
    ok(
        d,
        "strata",
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "-O",
            "qcow2",
            "top.qcow2",
            "z.qcow2",
        ],
    );
    verify(d, "top.qcow2", "z.qcow2");
    // -B: only the top layer is copied; the result reads the same through the base.
    ok(
        d,
        "strata",
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "b.qcow2",
        ],
    );
    verify(d, "top.qcow2", "b.qcow2");
    let own = ok(d, "qemu-img", &["map", "--output=json", "b.qcow2"]);
    assert!(
        own.contains("\"depth\": 1"),
        "nothing left to the backing file:\n{own}"
    );
    // -l: the snapshot, not the current state.
    ok(
        d,
        "qemu-img",
        &[
            "convert",
            "-l",
            "snapshot.name=snap",
            "-O",
            "raw",
            "top.qcow2",
            "snap-q.raw",
        ],
    );
    ok(
        d,
        "strata",
        &[
            "convert",
            "-l",
            "snapshot.name=snap",
            "-O",
            "qcow2",
            "top.qcow2",
            "snap.qcow2",
        ],
    );
    verify(d, "snap-q.raw", "snap.qcow2");
    ok(
        d,
        "strata",
        &[
            "convert",
            "-l",
            "snap",
            "-O",
            "raw",
            "top.qcow2",
            "snap2.raw",
        ],
    );
    ok(d, "cmp", &["snap-q.raw", "snap2.raw"]);
    // Several sources are concatenated.
    ok(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "text.raw", "cat-q.raw"],
    );
    ok(
        d,
        "strata",
        &[
            "convert",
            "-O",
            "qcow2",
            "top.qcow2",
            "text.raw",
            "cat.qcow2",
        ],
    );
    verify(d, "cat-q.raw", "cat.qcow2");
    // Single worker and progress work too.
    ok(
        d,
        "strata",
        &[
            "convert",
            "-p",
            "-m",
            "1",
            "-O",
            "qcow2",
            "top.qcow2",
            "m1.qcow2",
        ],
    );
    verify(d, "top.qcow2", "m1.qcow2");
}

#[test]
fn images_qemu_makes_convert_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    inputs(d);
    let q = |args: &[&str]| ok(d, "qemu-img", args);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "sub.qcow2",
        "8M",
    ]);
    io(
        d,
        "sub.qcow2",
        &[
            "write -P 11 4k 8k",
            "write -z 100k 4k",
            "write -P 12 1M 64k",
        ],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata,compat=0.10,cluster_size=4k",
        "pre.qcow2",
        "8M",
    ]);
    io(d, "pre.qcow2", &["write -P 13 1M 8k"]);
    q(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "top.qcow2",
        "z.qcow2",
    ]);
    for src in ["sub.qcow2", "pre.qcow2", "z.qcow2"] {
        let out = format!("out-{src}");
        ok(d, "strata", &["convert", "-O", "qcow2", src, &out]);
        verify(d, src, &out);
        let raw = format!("out-{src}.raw");
        ok(d, "strata", &["convert", "-O", "raw", src, &raw]);
        verify(d, src, &raw);
    }
}

#[test]
fn bad_arguments_fail_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
    );
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "small.qcow2", "1M"],
    );
    let cases: &[&[&str]] = &[
        &["convert", "-c", "-O", "raw", "a.qcow2", "x.raw"],
        &[
            "convert",
            "--target-is-zero",
            "-O",
            "raw",
            "a.qcow2",
            "x.raw",
        ],
        &["convert", "-n", "-O", "qcow2", "a.qcow2", "missing.qcow2"],
        &[
            "convert", "-O", "qcow2", "-o", "foo=1", "a.qcow2", "x.qcow2",
        ],
        &["convert", "-S", "100", "-O", "raw", "a.qcow2", "x.raw"],
        &["convert", "-m", "17", "-O", "raw", "a.qcow2", "x.raw"],
        &["convert", "-O", "raw", "missing", "x.raw"],
        &["convert", "-O", "vmdkx", "a.qcow2", "x.raw"],
        &["convert", "-n", "-O", "qcow2", "a.qcow2", "small.qcow2"],
        &[
            "convert", "-O", "qcow2", "-B", "a.qcow2", "a.qcow2", "x.qcow2",
        ],
        &[
            "convert", "-O", "raw", "-B", "a.qcow2", "-F", "qcow2", "a.qcow2", "x.raw",
        ],
        &[
            "convert", "-l", "nosuch", "-O", "qcow2", "a.qcow2", "x.qcow2",
        ],
    ];
    for c in cases {
        let ours = run(d, "strata", c);
        let theirs = run(d, "qemu-img", c);
        let norm = |o: &Output| {
            String::from_utf8_lossy(&o.stderr)
                .replace("strata img:", "PROG:")
                .replace("qemu-img:", "PROG:")
        };
        assert_eq!(ours.status.code(), Some(1), "{c:?}: {}", norm(&ours));
        assert_eq!(theirs.status.code(), Some(1), "{c:?}");
        assert_eq!(norm(&ours), norm(&theirs), "{c:?}");
    }
}
