//! `strata img convert` paths beyond the basic directions, against qemu-img 10:
//! `-B` where the source's clusters are smaller than the target's (a partly copied
//! cluster takes the rest from the backing file), every copy path (mapped or read
//! with `-U`, in order or `-W`, one or many threads, flushed with `-t writeback`)
//! giving the same image, incompressible clusters under `-c`, and cache/rate
//! arguments rejected with qemu-img's messages.

mod common;

use common::{ok, run, verify};
use std::path::Path;

/// qemu-io commands on a qcow2 image.
fn io(dir: &Path, file: &str, cmds: &[&str]) {
    common::io(dir, "qcow2", file, cmds);
}

#[test]
fn backing_target_fills_partly_copied_clusters_from_its_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"],
    );
    io(d, "base.qcow2", &["write -P 0x11 0 8M"]);
    // The overlay has 4 KiB clusters; the target gets 64 KiB ones, so each 4 KiB
    // write covers a sixteenth of a target cluster.
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    io(
        d,
        "top.qcow2",
        &[
            "write -P 0x22 68k 4k",
            "write -P 0x33 1M 12k",
            "write -z 2M 4k",
        ],
    );
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
            "out.qcow2",
        ],
    );
    verify(d, "top.qcow2", "out.qcow2");
    // Only the overlay's data was copied: a few clusters, not 8 MiB.
    let map = ok(d, "qemu-img", &["map", "--output=json", "out.qcow2"]);
    assert!(map.contains("\"depth\": 1"), "{map}");
    ok(
        d,
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "q.qcow2",
        ],
    );
    ok(d, "qemu-img", &["compare", "q.qcow2", "out.qcow2"]);
}

#[test]
fn every_copy_path_gives_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "20M"],
    );
    io(
        d,
        "src.qcow2",
        &[
            "write -P 7 0 3M",
            "write -P 9 5M 100k",
            "write -z 7M 1M",
            "write -P 3 19M 1M",
        ],
    );
    let cases: &[&[&str]] = &[
        &[],
        &["-U"],
        &["-W"],
        &["-m", "1"],
        &["-m", "16", "-W"],
        &["-t", "writeback", "-T", "none"],
        &["-S", "0"],
        &["-S", "64k"],
    ];
    for (i, extra) in cases.iter().enumerate() {
        for fmt in ["raw", "qcow2"] {
            let out = format!("out{i}.{fmt}");
            let mut args = vec!["convert", "-O", fmt];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["src.qcow2", &out]);
            ok(d, "strata", &args);
            verify(d, "src.qcow2", &out);
        }
    }
}

#[test]
fn incompressible_clusters_are_stored_plain_beside_compressed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 1 MiB of pseudo-random bytes, then 1 MiB of text.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut data: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    data.extend(b"convert me, I compress\n".iter().cycle().take(1 << 20));
    std::fs::write(d.join("mixed.raw"), &data).unwrap();
    for ty in ["zlib", "zstd"] {
        let out = format!("{ty}.qcow2");
        let o = format!("compression_type={ty}");
        ok(
            d,
            "strata",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &o,
                "-f",
                "raw",
                "mixed.raw",
                &out,
            ],
        );
        verify(d, "mixed.raw", &out);
        let map = ok(d, "qemu-img", &["map", "--output=json", &out]);
        assert!(map.contains("\"compressed\": true"), "{ty}:\n{map}");
        assert!(map.contains("\"compressed\": false"), "{ty}:\n{map}");
        let size = std::fs::metadata(d.join(&out)).unwrap().len();
        assert!(size < (3 << 19), "{ty}: {size} bytes");
    }
}

#[test]
fn bad_cache_and_rate_arguments_fail_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, "qemu-img", &["create", "-q", "-f", "raw", "a.raw", "1M"]);
    for (args, msg) in [
        (&["-t", "bogus"][..], "Invalid cache option: bogus"),
        (&["-T", "bogus"][..], "Invalid source cache option: bogus"),
        (&["-r", "1x"][..], "Invalid rate limit specified: '1x'."),
        (
            &["-r", "-5"][..],
            "Invalid rate limit specified. Must be between 0 and 9223372036854775807.",
        ),
    ] {
        for prog in ["qemu-img", "strata"] {
            let mut a = vec!["convert"];
            a.extend_from_slice(args);
            a.extend_from_slice(&["a.raw", "b.raw"]);
            let o = run(d, prog, &a);
            assert_eq!(o.status.code(), Some(1), "{prog} {args:?}");
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains(msg), "{prog} {args:?}: {err}");
        }
    }
}

#[test]
fn bad_target_options_fail_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    );
    for (fmt, opts) in [
        ("qcow2", "preallocation=bogus"),
        ("qcow2", "compat=2"),
        ("qcow2", "cluster_size=3000"),
        ("qcow2", "cluster_size=abc"),
        ("qcow2", "foo=bar"),
        ("raw", "preallocation=metadata"),
    ] {
        let mut seen = Vec::new();
        for prog in ["qemu-img", "strata"] {
            let out = format!("b.{fmt}");
            let o = run(
                d,
                prog,
                &["convert", "-O", fmt, "-o", opts, "a.qcow2", &out],
            );
            let err = String::from_utf8_lossy(&o.stderr)
                .replace("strata img:", "qemu-img:")
                .to_string();
            seen.push((o.status.code(), err));
            let _ = std::fs::remove_file(d.join(&out));
        }
        assert_eq!(seen[0], seen[1], "-O {fmt} -o {opts}");
    }
}

/// `-r RATE` holds the copy to RATE bytes per second: 6 MiB at 4 MiB/s cannot end
/// in under a second (the limit only ever slows a copy down, so this cannot flake
/// on a slow machine), and the result is the same image.
#[test]
fn rate_limit_holds_the_copy_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(d.join("a.raw"), data).unwrap();
    let t = std::time::Instant::now();
    ok(
        d,
        "strata",
        &[
            "convert", "-f", "raw", "-O", "qcow2", "-r", "4M", "a.raw", "b.qcow2",
        ],
    );
    let took = t.elapsed();
    assert!(took >= std::time::Duration::from_millis(1000), "{took:?}");
    ok(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", "a.raw", "b.qcow2"],
    );
}
