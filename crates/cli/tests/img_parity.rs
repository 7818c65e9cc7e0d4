//! `strata img` prints what qemu-img prints. Every inspection subcommand runs on the
//! same images (made by the real qemu-img/qemu-io 10: both versions, several cluster
//! sizes, compressed zlib and zstd, zero clusters, subclusters, backing chains over
//! qcow2 and raw, preallocation, snapshots, bitmaps, odd sizes, damaged refcounts)
//! through both tools; stdout, stderr and the exit code must be identical.

mod common;

use common::damage::poke_refcount;
use common::{assert_all_same, ok, outcome, same, sh};
use std::path::Path;
use std::process::Command;

/// The image zoo, built in `dir`; returns the image names.
fn zoo(dir: &Path) -> Vec<&'static str> {
    let q = |args: &[&str]| sh(dir, "qemu-img", args);
    let io = |f: &str, fmt: &str, cmds: &[&str]| {
        let mut a = vec!["-f", fmt];
        for c in cmds {
            a.push("-c");
            a.push(c);
        }
        a.push(f);
        sh(dir, "qemu-io", &a);
    };
    q(&["create", "-q", "-f", "raw", "base.raw", "48M"]);
    io(
        "base.raw",
        "raw",
        &["write -P 0x11 0 1M", "write -P 0x12 20M 64k"],
    );
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    io(
        "base.qcow2",
        "qcow2",
        &["write -P 1 0 1M", "write -z 4M 1M", "write -P 2 10M 100k"],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "96M",
    ]);
    io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 3 512k 1M",
            "write -P 4 80M 1M",
            "write -z 10M 64k",
        ],
    );
    q(&["snapshot", "-c", "first", "top.qcow2"]);
    io("top.qcow2", "qcow2", &["write -P 5 0 4k"]);
    q(&["bitmap", "--add", "top.qcow2", "dirty0"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "overraw.qcow2",
        "64M",
    ]);
    io("overraw.qcow2", "qcow2", &["write -P 6 30M 2M"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=4k",
        "v2.qcow2",
        "16M",
    ]);
    io(
        "v2.qcow2",
        "qcow2",
        &["write -P 7 0 300k", "write -P 8 8M 4k"],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512,refcount_bits=1",
        "small.qcow2",
        "4M",
    ]);
    io("small.qcow2", "qcow2", &["write -P 9 1000 10000"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M,refcount_bits=64",
        "big.qcow2",
        "64M",
    ]);
    io("big.qcow2", "qcow2", &["write -P 10 3M 5M"]);
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
        "sub.qcow2",
        "qcow2",
        &[
            "write -P 11 4k 8k",
            "write -z 100k 4k",
            "write -P 12 1M 64k",
        ],
    );
    q(&["convert", "-c", "-O", "qcow2", "top.qcow2", "zlib.qcow2"]);
    q(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "top.qcow2",
        "zstd.qcow2",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata,cluster_size=4k",
        "meta.qcow2",
        "12M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=falloc",
        "falloc.qcow2",
        "8M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=full,lazy_refcounts=on",
        "full.qcow2",
        "4M",
    ]);
    std::fs::write(dir.join("odd.raw"), vec![0x5au8; 1000]).unwrap();
    q(&["create", "-q", "-f", "qcow2", "empty.qcow2", "1G"]);
    // Damaged: a leaked cluster (refcount 1, no reference) and a refcount too low.
    q(&["create", "-q", "-f", "qcow2", "leak.qcow2", "16M"]);
    io("leak.qcow2", "qcow2", &["write -P 13 0 128k"]);
    std::fs::copy(dir.join("leak.qcow2"), dir.join("low.qcow2")).unwrap();
    let len = std::fs::metadata(dir.join("leak.qcow2")).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("leak.qcow2"))
        .unwrap();
    f.set_len(len + 65536).unwrap();
    poke_refcount(&dir.join("leak.qcow2"), len / 65536, 1);
    poke_refcount(&dir.join("low.qcow2"), 4, 0);
    vec![
        "base.raw",
        "base.qcow2",
        "top.qcow2",
        "overraw.qcow2",
        "v2.qcow2",
        "small.qcow2",
        "big.qcow2",
        "sub.qcow2",
        "zlib.qcow2",
        "zstd.qcow2",
        "meta.qcow2",
        "falloc.qcow2",
        "full.qcow2",
        "odd.raw",
        "empty.qcow2",
        "leak.qcow2",
        "low.qcow2",
    ]
}

#[test]
fn info_map_check_measure_and_snapshot_list_print_what_qemu_img_prints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for img in zoo(d) {
        for out in ["--output=human", "--output=json"] {
            same(d, &["info", out, img]);
            same(d, &["info", out, "--backing-chain", img]);
            same(d, &["map", out, img]);
            same(d, &["check", out, img]);
            same(d, &["measure", out, "-O", "qcow2", img]);
            same(d, &["measure", out, "-O", "raw", img]);
            same(
                d,
                &[
                    "measure",
                    out,
                    "-O",
                    "qcow2",
                    "-o",
                    "cluster_size=4k,extended_l2=on",
                    img,
                ],
            );
        }
        same(d, &["map", "--output=json", "-s", "1M", "-l", "9M", img]);
        same(d, &["snapshot", "-l", img]);
        same(
            d,
            &[
                "measure",
                "-O",
                "qcow2",
                "-o",
                "refcount_bits=1,compat=0.10",
                img,
            ],
        );
    }
    same(d, &["measure", "-O", "qcow2", "-l", "first", "top.qcow2"]);
    same(
        d,
        &[
            "measure",
            "-O",
            "qcow2",
            "-l",
            "snapshot.name=first",
            "top.qcow2",
        ],
    );
    for size in ["1G", "1000", "123456789", "2T"] {
        for o in [
            "cluster_size=512",
            "preallocation=full",
            "extended_l2=on",
            "refcount_bits=64",
        ] {
            same(
                d,
                &[
                    "measure",
                    "--output=json",
                    "-O",
                    "qcow2",
                    "-o",
                    o,
                    "--size",
                    size,
                ],
            );
        }
    }
    assert_all_same();
}

#[test]
fn compare_reports_what_qemu_img_reports() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    zoo(d);
    sh(d, "cp", &["top.qcow2", "copy.qcow2"]);
    sh(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 99 81M 1", "copy.qcow2"],
    );
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "short.qcow2", "1M"],
    );
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "long.qcow2", "2M"],
    );
    sh(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 1500000 1", "long.qcow2"],
    );
    let pairs: &[&[&str]] = &[
        &["top.qcow2", "top.qcow2"],
        &["top.qcow2", "zlib.qcow2"],
        &["-s", "top.qcow2", "zlib.qcow2"],
        &["top.qcow2", "zstd.qcow2"],
        &["top.qcow2", "copy.qcow2"],
        &["top.qcow2", "base.qcow2"],
        &["-s", "top.qcow2", "base.qcow2"],
        &["base.raw", "overraw.qcow2"],
        &["-f", "raw", "-F", "qcow2", "odd.raw", "empty.qcow2"],
        &["short.qcow2", "long.qcow2"],
        &["-s", "short.qcow2", "long.qcow2"],
        &["empty.qcow2", "meta.qcow2"],
        &["-s", "empty.qcow2", "meta.qcow2"],
        &["-q", "top.qcow2", "copy.qcow2"],
        &["top.qcow2", "missing.qcow2"],
    ];
    for p in pairs {
        let mut args = vec!["compare"];
        args.extend_from_slice(p);
        same(d, &args);
    }
    assert_all_same();
}

#[test]
fn create_prints_and_makes_what_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    for d in [&a, &b] {
        sh(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "base.qcow2", "32M"],
        );
        sh(
            d,
            "qemu-img",
            &["create", "-q", "-f", "raw", "base.raw", "8M"],
        );
    }
    let cases: &[&[&str]] = &[
        &["create", "-f", "qcow2", "c1.qcow2", "1G"],
        &["create", "-f", "raw", "c2.raw", "10M"],
        &["create", "c3.img", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "c4.qcow2",
        ],
        &[
            "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "c5.qcow2", "20M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=4k,preallocation=metadata",
            "c6.qcow2",
            "10M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd,extended_l2=on,refcount_bits=8,lazy_refcounts=on",
            "c7.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=full",
            "c8.raw",
            "1M",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=falloc",
            "c9.raw",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "size=5M", "c10.qcow2"],
        &["create", "-f", "qcow2", "c11.qcow2", "1000"],
        &["create", "-f", "qcow2", "-q", "c12.qcow2", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nonexist.qcow2",
            "-F",
            "qcow2",
            "c13.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=v3,preallocation=falloc,cluster_size=128k",
            "c14.qcow2",
            "3M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "c15.qcow2",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "c16.qcow2",
            "5G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=8k",
            "c17.qcow2",
            "5G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "c18.qcow2",
            "100G",
        ],
        &["create", "-f", "qcow2", "x1.qcow2"],
        &["create", "-f", "qcow2", "-o", "foo=bar", "x2.qcow2", "1M"],
        &["create", "-f", "vmdkx", "x3", "1M"],
        &["create", "-f", "qcow2", "x4.qcow2", "--", "-1"],
        // Refused by the format after the "Formatting" line, or by option parsing
        // before it, with qemu-img's words.
        &["create", "-f", "qcow2", "-o", "compat=2", "x5.qcow2", "1G"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compression_type=lz4",
            "x6.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=bogus",
            "x7.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=abc",
            "x8.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3000",
            "x9.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=128",
            "x10.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on,compression_type=zstd",
            "x11.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=4k,refcount_bits=3",
            "x12.qcow2",
            "1G",
        ],
        &["create", "-f", "qcow2", "-o", "size=abc", "x13.qcow2"],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=metadata",
            "x14.raw",
            "1M",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=bogus",
            "x15.raw",
            "1M",
        ],
        &["create", "-f", "qcow2", "-b", "base.qcow2", "x16.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "nonexist.qcow2",
            "-F",
            "qcow2",
            "x17.qcow2",
            "1G",
        ],
        &["create", "-f", "qcow2", "-F", "qcow2", "x18.qcow2", "1G"],
        &["create", "-f", "qcow2", "x19.qcow2", "1Q"],
        &["create", "-f", "qcow2", "x20.qcow2", "16E"],
        &["create", "-f", "qcow2", "x21.qcow2", "--", "-1k"],
    ];
    for c in cases {
        let ours = outcome(&a, "strata", c);
        let theirs = outcome(&b, "qemu-img", c);
        assert_eq!(ours, theirs, "`strata img {}`", c.join(" "));
        let Some(name) = c.iter().find(|x| {
            x.contains('.')
                && !x.starts_with("base")
                && !x.starts_with("compat")
                && !x.starts_with("compression")
                && !x.starts_with("size")
                && !x.starts_with("nonexist")
        }) else {
            continue;
        };
        let (pa, pb) = (a.join(name), b.join(name));
        if ours.0 != Some(0) {
            continue;
        }
        // Same guest content and allocation, and qemu-img finds ours clean.
        let cmp = Command::new("qemu-img")
            .args(["compare", "-s", "-U"])
            .arg(&pa)
            .arg(&pb)
            .output()
            .unwrap();
        if !c.contains(&"-u") {
            assert!(
                cmp.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&cmp.stdout)
            );
        }
        if name.ends_with(".qcow2") && !c.contains(&"-u") {
            let chk = Command::new("qemu-img")
                .arg("check")
                .arg(&pa)
                .output()
                .unwrap();
            assert!(
                chk.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&chk.stdout)
            );
            let info = |p: &Path| {
                let o = Command::new("qemu-img")
                    .args(["info", "-U", "--output=json"])
                    .arg(p)
                    .output()
                    .unwrap();
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                (
                    v["virtual-size"].clone(),
                    v["cluster-size"].clone(),
                    v["format-specific"].clone(),
                    v["backing-filename"].clone(),
                )
            };
            assert_eq!(info(&pa), info(&pb), "{name}: qemu-img info differs");
            // Without preallocated data (where QEMU places refcount structures by
            // its own sizing), the file is QEMU's byte for byte, length included.
            if !c.iter().any(|o| o.contains("falloc") || o.contains("full")) {
                let (ours, theirs) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
                assert!(
                    ours == theirs,
                    "{name}: {} bytes, qemu-img's {} bytes, first difference at {:?}",
                    ours.len(),
                    theirs.len(),
                    ours.iter().zip(&theirs).position(|(x, y)| x != y)
                );
            }
        }
    }
}

/// Refusals that scripts match on: same words, same exit code.
#[test]
fn refusals_are_worded_as_qemu_img_words_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
    );
    sh(d, "qemu-img", &["snapshot", "-c", "s1", "base.qcow2"]);
    sh(d, "qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    std::fs::create_dir(d.join("sub")).unwrap();
    sh(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "sub/orphan.qcow2",
            "1M",
        ],
    );
    let mut v9 = b"QFI\xfb\x00\x00\x00\x09".to_vec();
    v9.resize(1024, 0);
    std::fs::write(d.join("v9.qcow2"), v9).unwrap();
    let cases: &[&[&str]] = &[
        &["info", "-f", "qcow2", "r.raw"],
        &["info", "v9.qcow2"],
        &["info", "sub/orphan.qcow2"],
        &["check", "sub/orphan.qcow2"],
        &["snapshot", "-a", "nosuch", "base.qcow2"],
        &["snapshot", "-d", "nosuch", "base.qcow2"],
        &["snapshot", "-f", "raw", "-l", "r.raw"],
        &["snapshot", "-f", "raw", "-c", "s", "r.raw"],
        &["snapshot", "-f", "raw", "-a", "s", "r.raw"],
        &["snapshot", "-f", "raw", "-d", "s", "r.raw"],
        &["resize", "-f", "raw", "r.raw", "1Q"],
        &["resize", "-f", "raw", "r.raw", "+16E"],
        &["resize", "-f", "raw", "r.raw", "--", "-abc"],
        &["measure", "-O", "qcow2", "--size", "1Q"],
        &["measure", "-O", "qcow2", "--size", "-5"],
        &["measure", "-O", "qcow2", "--size", "16E"],
        &["check", "-r", "leaks", "r.raw"],
        &["check", "-r", "foo", "base.qcow2"],
        &["map", "-s", "-1", "base.qcow2"],
        &["map", "-l", "foo", "base.qcow2"],
        &["map", "--max-length=99999999999999999999", "base.qcow2"],
        &["map", "--start-offset=1.5x", "base.qcow2"],
        &["rebase", "base.qcow2"],
        &["create"],
        &["create", "-f", "qcow2"],
        &["create", "-f"],
        &["info"],
        &["info", "-q", "base.qcow2"],
        &["info", "--foo=3", "base.qcow2"],
        &["info", "base.qcow2", "r.raw"],
        &["map", "--output"],
        &["check", "--output=xml", "base.qcow2"],
        &["compare", "base.qcow2"],
        &["measure"],
        &["resize", "base.qcow2"],
        &["snapshot", "-c", "a", "-d", "b", "base.qcow2"],
        &["commit"],
        &["convert"],
        &["convert", "-O", "raw", "r.raw"],
        &["resize", "--preallocation=foo", "base.qcow2", "+1M"],
        &[
            "resize",
            "--shrink",
            "--preallocation=falloc",
            "base.qcow2",
            "1M",
        ],
    ];
    for c in cases {
        same(d, c);
    }
    assert_all_same();
    // `rebase -u` without -b drops the backing file (qemu-img does the same).
    let (code, _, err) = outcome(d, "strata", &["rebase", "-u", "sub/orphan.qcow2"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, info, _) = outcome(d, "qemu-img", &["info", "sub/orphan.qcow2"]);
    assert!(!info.contains("backing file"), "{info}");
}

/// qemu-img accepts a snapshot name that is taken or empty (the IDs tell the
/// snapshots apart) and `-d NAME` deletes the first of that name: strata's CLI
/// keeps that, though its services refuse such names.
#[test]
fn repeated_and_empty_snapshot_names_are_taken_as_qemu_img_takes_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "s.qcow2", "1M"],
    );
    // Each tool adds one snapshot per call, on the same file.
    same(d, &["snapshot", "-c", "a", "s.qcow2"]);
    same(d, &["snapshot", "-c", "", "s.qcow2"]);
    let tags = |list: &str| -> Vec<(String, String)> {
        list.lines()
            .skip(2)
            .map(|l| {
                let id = l[..8].trim().to_string();
                (id, l[8..25].trim().to_string())
            })
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    let listed = ok(d, "qemu-img", &["snapshot", "-l", "s.qcow2"]);
    assert_eq!(
        tags(&listed),
        pairs(&[("1", "a"), ("2", "a"), ("3", ""), ("4", "")]),
        "{listed}"
    );
    same(d, &["snapshot", "-d", "a", "s.qcow2"]);
    same(d, &["snapshot", "-l", "s.qcow2"]);
    assert_all_same();
    let listed = ok(d, "qemu-img", &["snapshot", "-l", "s.qcow2"]);
    assert_eq!(tags(&listed), pairs(&[("3", ""), ("4", "")]), "{listed}");
    ok(d, "qemu-img", &["check", "s.qcow2"]);
}

/// `resize`, growing and with `--shrink`, leaves what qemu-img leaves: the same
/// messages and exit code, the same map, the same file length (a shrink gives the
/// freed tail of the file back), a clean check and the same guest content.
#[test]
fn resize_leaves_what_qemu_img_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Damaged images are left out: what a write does to them is not defined.
    let images: Vec<&str> = zoo(d)
        .into_iter()
        .filter(|i| !matches!(*i, "leak.qcow2" | "low.qcow2"))
        .collect();
    let sizes: &[&[&str]] = &[
        &["--shrink", "1M"],
        &["--shrink", "8500k"],
        &["--shrink", "40M"],
        &["+1M"],
        &["3G"],
        &["--", "-1M"],
    ];
    let len = |p: &str| std::fs::metadata(d.join(p)).unwrap().len();
    for img in images {
        for size in sizes {
            let ours = format!("o-{img}");
            let theirs = format!("t-{img}");
            std::fs::copy(d.join(img), d.join(&ours)).unwrap();
            std::fs::copy(d.join(img), d.join(&theirs)).unwrap();
            let resize = |prog: &str, f: &str| {
                let mut a = vec!["resize", f];
                a.extend_from_slice(size);
                outcome(d, prog, &a)
            };
            let r_ours = resize("strata", &ours);
            let r_theirs = resize("qemu-img", &theirs);
            let what = format!("resize {img} {size:?}");
            let norm = |r: &(Option<i32>, String, String), f: &str| {
                (r.0, r.1.replace(f, "IMG"), r.2.replace(f, "IMG"))
            };
            assert_eq!(norm(&r_ours, &ours), norm(&r_theirs, &theirs), "{what}");
            let map = |f: &str| outcome(d, "qemu-img", &["map", "--output=json", f]).1;
            assert_eq!(map(&ours), map(&theirs), "{what}: map");
            // Bitmaps too are stored as QEMU stores them at the new size.
            assert_eq!(len(&ours), len(&theirs), "{what}: file length");
            if img.ends_with(".qcow2") {
                let (code, out, err) = outcome(d, "qemu-img", &["check", &ours]);
                assert_eq!(code, Some(0), "{what}: check\n{out}{err}");
            }
            let (code, out, err) = outcome(d, "qemu-img", &["compare", &ours, &theirs]);
            assert_eq!(code, Some(0), "{what}: compare\n{out}{err}");
        }
    }
}

/// A header `size` that is not a multiple of 512 (64 MiB + 3, as some tools
/// write): QEMU rounds it down to whole sectors, and so does strata.
#[test]
fn a_header_size_off_the_sector_grid_is_rounded_down_as_qemu_does() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, compat) in [("odd3.qcow2", "1.1"), ("odd2.qcow2", "0.10")] {
        let compat = format!("compat={compat}");
        sh(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &compat, name, "64M"],
        );
        sh(
            d,
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 7 63M 1M", name],
        );
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join(name))
            .unwrap();
        f.seek(SeekFrom::Start(24)).unwrap();
        f.write_all(&((64u64 << 20) + 3).to_be_bytes()).unwrap();
        drop(f);
        for args in [
            &["info", name][..],
            &["info", "--output=json", name],
            &["map", "--output=json", name],
            &["check", name],
            &["measure", "-O", "qcow2", name],
        ] {
            same(d, args);
        }
    }
    same(d, &["compare", "odd3.qcow2", "odd2.qcow2"]);
    assert_all_same();
}

/// Sizes at the edges of `resize` (QEMU reads them as unsigned 64-bit values and
/// adds them as signed ones, so large ones wrap): the same refusal, word for word.
/// And `commit --top` of the bottom image is refused as qemu-img refuses a commit
/// of an image without a backing file.
#[test]
fn resize_edge_sizes_and_a_commit_of_the_bottom_are_refused_as_qemu_img_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sizes = [
        "+9223372036854775807",
        "+9223372036854775808",
        "+8E",
        "+15E",
        "+15.9E",
        "+16E",
        "+18446744073709551615",
        "+18446744073709551616",
        "-9223372036854775808",
        "-18446744073709551615",
        "-67108864",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "8E",
        "16E",
    ];
    for size in sizes {
        for img in ["o.qcow2", "t.qcow2"] {
            sh(d, "qemu-img", &["create", "-q", "-f", "qcow2", img, "64M"]);
        }
        let ours = outcome(d, "strata", &["resize", "o.qcow2", "--", size]);
        let theirs = outcome(d, "qemu-img", &["resize", "t.qcow2", "--", size]);
        let norm = |r: (Option<i32>, String, String), f: &str| {
            (r.0, r.1.replace(f, "IMG"), r.2.replace(f, "IMG"))
        };
        assert_eq!(
            norm(ours, "o.qcow2"),
            norm(theirs, "t.qcow2"),
            "resize -- {size}"
        );
    }
    sh(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "o.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    assert_eq!(
        outcome(d, "strata", &["commit", "--top", "o.qcow2", "top.qcow2"]),
        outcome(d, "qemu-img", &["commit", "o.qcow2"]),
    );
}

/// A QEMU-made overlay whose backing file name is not UTF-8 (names are bytes)
/// opens, and every command prints the name as qemu-img prints it: its bytes in
/// text, U+FFFD for each invalid sequence in JSON.
#[test]
fn a_backing_file_name_that_is_not_utf8_is_kept_as_bytes() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = OsStr::from_bytes(b"b\xe9se.qcow2");
    let os = OsStr::new;
    sh(
        d,
        "qemu-img",
        &[
            os("create"),
            os("-q"),
            os("-f"),
            os("qcow2"),
            base,
            os("4M"),
        ],
    );
    sh(
        d,
        "qemu-io",
        &[os("-f"), os("qcow2"), os("-c"), os("write -P 9 0 1M"), base],
    );
    let overlay = [
        "create", "-q", "-f", "qcow2", "-b", "", "-F", "qcow2", "ov.qcow2",
    ];
    let mut args: Vec<&OsStr> = overlay.iter().map(|a| os(a)).collect();
    args[5] = base;
    sh(d, "qemu-img", &args);
    sh(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 8 1M 64k", "ov.qcow2"],
    );
    let cases: &[&[&str]] = &[
        &["info", "ov.qcow2"],
        &["info", "--output=json", "ov.qcow2"],
        &["info", "--backing-chain", "ov.qcow2"],
        &["info", "--backing-chain", "--output=json", "ov.qcow2"],
        &["map", "ov.qcow2"],
        &["map", "--output=json", "ov.qcow2"],
        &["check", "ov.qcow2"],
        &["measure", "-O", "qcow2", "ov.qcow2"],
    ];
    for args in cases {
        // Byte for byte (the parity runner reads output as text).
        let stdout = |prog: &str| {
            let mut c = if prog == "strata" {
                let mut c = Command::new(common::STRATA);
                c.arg("img");
                c
            } else {
                Command::new(prog)
            };
            c.args(*args).current_dir(d).output().unwrap().stdout
        };
        assert_eq!(stdout("strata"), stdout("qemu-img"), "img {args:?}");
        same(d, args);
    }
    assert_all_same();
}

/// A snapshot without an instruction count (the field holds -1, as QEMU writes
/// for a VM run without icount): `snapshot -l` and `info` show it as qemu-img
/// does (`--` in the ICOUNT column, no JSON field); a real count is printed.
#[test]
fn a_snapshot_without_an_instruction_count_is_listed_as_qemu_img_lists_it() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, icount) in [("none.qcow2", u64::MAX), ("some.qcow2", 123_456_789)] {
        sh(d, "qemu-img", &["create", "-q", "-f", "qcow2", name, "1M"]);
        sh(d, "qemu-img", &["snapshot", "-c", "s1", name]);
        sh(
            d,
            "qemu-img",
            &["snapshot", "-c", "a name longer than sixteen", name],
        );
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.join(name))
            .unwrap();
        let mut h = [0u8; 72];
        f.read_exact(&mut h).unwrap();
        let table = u64::from_be_bytes(h[64..72].try_into().unwrap());
        // The first entry's extra data: VM state size, disk size, then icount.
        f.seek(SeekFrom::Start(table + 36)).unwrap();
        let mut extra = [0u8; 4];
        f.read_exact(&mut extra).unwrap();
        assert_eq!(
            u32::from_be_bytes(extra),
            24,
            "QEMU writes the icount field"
        );
        f.seek(SeekFrom::Start(table + 40 + 16)).unwrap();
        f.write_all(&icount.to_be_bytes()).unwrap();
        drop(f);
        for args in [
            &["snapshot", "-l", name][..],
            &["info", name],
            &["info", "--output=json", name],
        ] {
            same(d, args);
        }
    }
    assert_all_same();
}
