//! `-p` when stdout is not a terminal (a pipe, a log, a script): strata prints
//! qemu-img's own progress lines, `    (NN.NN/100%)` and a carriage return, at the
//! same steps, for every command that has `-p` (convert, compare, rebase, amend,
//! commit). The images are QEMU's (data runs, zero clusters, compressed
//! clusters, subclusters, backing chains over qcow2 and raw, several cluster
//! sizes, an odd-sized raw file, metadata preallocation).

mod common;

use common::{assert_all_same, differs, outcome, same, same_image, same_on_copies, sh};
use std::path::Path;

/// The images: name, `qemu-img create` options and size, `qemu-io` writes.
const IMAGES: &[(&str, &[&str], &[&str])] = &[
    (
        "base.raw",
        &["-f", "raw", "48M"],
        &["write -P 0x11 0 1M", "write -P 0x12 20M 64k"],
    ),
    (
        "base.qcow2",
        &["-f", "qcow2", "64M"],
        &["write -P 1 0 1M", "write -z 4M 1M", "write -P 2 10M 100k"],
    ),
    (
        "top.qcow2",
        &["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "96M"],
        &[
            "write -P 3 512k 1M",
            "write -P 4 80M 1M",
            "write -z 10M 64k",
        ],
    ),
    (
        "overraw.qcow2",
        &["-f", "qcow2", "-b", "base.raw", "-F", "raw", "64M"],
        &["write -P 6 30M 2M"],
    ),
    (
        "v2.qcow2",
        &["-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", "16M"],
        &["write -P 7 0 300k", "write -P 8 8M 4k"],
    ),
    (
        "small.qcow2",
        &["-f", "qcow2", "-o", "cluster_size=512", "4M"],
        &["write -P 9 1000 10000"],
    ),
    (
        "big.qcow2",
        &["-f", "qcow2", "-o", "cluster_size=2M", "64M"],
        &["write -P 10 3M 5M"],
    ),
    (
        "sub.qcow2",
        &["-f", "qcow2", "-o", "extended_l2=on", "8M"],
        &[
            "write -P 11 4k 8k",
            "write -z 100k 4k",
            "write -P 12 1M 64k",
        ],
    ),
    (
        "meta.qcow2",
        &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata,cluster_size=4k",
            "12M",
        ],
        &[],
    ),
    ("empty.qcow2", &["-f", "qcow2", "1G"], &[]),
];

/// The images, built in `dir` (and a compressed copy of top.qcow2, a raw file of
/// 1000 bytes and one with many short data runs); returns their names.
fn images(dir: &Path) -> Vec<&'static str> {
    let mut names = Vec::new();
    for (name, create, writes) in IMAGES {
        let (size, opts) = create.split_last().expect("a size");
        let mut a = vec!["create", "-q"];
        a.extend_from_slice(opts);
        a.extend_from_slice(&[name, size]);
        sh(dir, "qemu-img", &a);
        if !writes.is_empty() {
            common::io(dir, create[1], name, writes);
        }
        names.push(*name);
    }
    sh(
        dir,
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "top.qcow2", "zlib.qcow2"],
    );
    std::fs::write(dir.join("odd.raw"), vec![0x5au8; 1000]).unwrap();
    // Many short data runs: many steps, each below and above the minimum step.
    sh(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "frag.qcow2", "40M"],
    );
    let writes: Vec<String> = (0..38)
        .map(|i| format!("write -P {i} {}k 300k", i * 1000))
        .collect();
    common::io(dir, "qcow2", "frag.qcow2", &writes);
    names.extend(["zlib.qcow2", "odd.raw", "frag.qcow2"]);
    names
}

/// Run `args` (with `OUT` standing for the output file) through both tools, each
/// writing its own output, and record any difference in what they print.
fn same_output(dir: &Path, args: &[&str]) {
    let run = |prog: &str, out: &str| {
        let a: Vec<&str> = args
            .iter()
            .map(|x| if *x == "OUT" { out } else { x })
            .collect();
        let _ = std::fs::remove_file(dir.join(out));
        let (code, stdout, stderr) = outcome(dir, prog, &a);
        (code, stdout.replace(out, "OUT"), stderr.replace(out, "OUT"))
    };
    let (ours, theirs) = (run("strata", "o.out"), run("qemu-img", "t.out"));
    if ours != theirs {
        differs(format!(
            "`img {}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}",
            args.join(" ")
        ));
    }
}

#[test]
fn convert_progress_is_qemu_imgs_lines_at_the_same_steps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for img in images(d) {
        for opts in [
            &["-O", "qcow2"][..],
            &["-O", "raw"],
            &["-c", "-O", "qcow2"],
            &["-c", "-O", "qcow2", "-o", "cluster_size=4k"],
            &["-S", "0", "-O", "raw"],
        ] {
            let mut args = vec!["convert", "-p"];
            args.extend_from_slice(opts);
            args.extend_from_slice(&[img, "OUT"]);
            same_output(d, &args);
        }
    }
    let cases: &[&[&str]] = &[
        // Only the top layer is copied onto a backing file.
        &[
            "convert",
            "-p",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "OUT",
        ],
        &[
            "convert",
            "-p",
            "-O",
            "qcow2",
            "-B",
            "base.raw",
            "-F",
            "raw",
            "overraw.qcow2",
            "OUT",
        ],
        // Several sources, one after the other.
        &[
            "convert", "-p", "-O", "raw", "base.raw", "odd.raw", "v2.qcow2", "OUT",
        ],
        // Failures end the line; quiet prints nothing.
        &["convert", "-p", "-O", "raw", "missing.qcow2", "OUT"],
        &[
            "convert",
            "-p",
            "-O",
            "raw",
            "-l",
            "nosuch",
            "top.qcow2",
            "OUT",
        ],
        &["convert", "-p", "-q", "-O", "raw", "top.qcow2", "OUT"],
    ];
    for c in cases {
        same_output(d, c);
    }
    assert_all_same();
}

#[test]
fn compare_progress_is_qemu_imgs_lines_around_its_messages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let all = images(d);
    // Same and different content, sizes that differ (the size warning falls
    // between the lines), images that open and that do not.
    for a in &all {
        for b in [
            "top.qcow2",
            "zlib.qcow2",
            "empty.qcow2",
            "frag.qcow2",
            "odd.raw",
        ] {
            same(d, &["compare", "-p", a, b]);
        }
    }
    for c in [
        &["compare", "-p", "-s", "top.qcow2", "zlib.qcow2"][..],
        &["compare", "-p", "-s", "top.qcow2", "base.qcow2"],
        &["compare", "-p", "missing.qcow2", "top.qcow2"],
        &["compare", "-p", "-q", "top.qcow2", "top.qcow2"],
    ] {
        same(d, c);
    }
    assert_all_same();
}

#[test]
fn rebase_and_amend_progress_is_qemu_imgs_lines_and_the_images_agree() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "nb.qcow2", "96M"],
    );
    common::io(d, "qcow2", "nb.qcow2", &["write -P 5 0 5M"]);
    let rebases: &[(&str, &[&str])] = &[
        ("top.qcow2", &["-p", "-b", "nb.qcow2", "-F", "qcow2"]),
        ("top.qcow2", &["-p", "-b", ""]),
        ("top.qcow2", &["-p", "-u", "-b", "nb.qcow2", "-F", "qcow2"]),
        ("overraw.qcow2", &["-p", "-b", "base.qcow2", "-F", "qcow2"]),
        ("overraw.qcow2", &["-p", "-c", "-b", ""]),
        ("top.qcow2", &["-p", "-b", "missing.qcow2", "-F", "qcow2"]),
        ("top.qcow2", &["-p", "-q", "-b", ""]),
        // A raw image takes no link: the last figure, then the refusal.
        (
            "odd.raw",
            &["-p", "-f", "raw", "-b", "base.qcow2", "-F", "qcow2"],
        ),
        ("odd.raw", &["-p", "-u", "-f", "raw", "-b", ""]),
    ];
    let mut n = 0;
    for (img, args) in rebases {
        n += 1;
        let (ours, theirs) = same_on_copies(d, n, img, "rebase", args, &[]);
        // strata stores ranges that only the old backing file read as zeroes as
        // zero clusters where qemu-img writes zeroed data: the files' lengths
        // differ, the guest view and the backing link do not.
        common::verify(d, &theirs, &ours);
        let backing = |f: &str| {
            let (_, info, _) = outcome(d, "qemu-img", &["info", "-U", f]);
            info.lines()
                .filter(|l| l.starts_with("backing file"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(backing(&ours), backing(&theirs), "rebase {args:?} {img}");
    }
    for img in [
        "base.qcow2",
        "top.qcow2",
        "v2.qcow2",
        "sub.qcow2",
        "frag.qcow2",
    ] {
        for o in ["compat=0.10", "refcount_bits=1", "compat=1.1"] {
            n += 1;
            let (ours, theirs) = same_on_copies(d, n, img, "amend", &["-p", "-o", o], &[]);
            same_image(d, &ours, &theirs, &format!("amend -o {o} {img}"));
        }
    }
    same(d, &["amend", "-p", "-o", "compat=1.1", "missing.qcow2"]);
    assert_all_same();
}

/// qemu-img commit prints the figure of a block job each time its event loop
/// wakes, so how often a figure repeats, and which figures between 0 and 100 it
/// shows, depend on timing. What does not: the line format, a first line at 0, a
/// figure that never falls, a last line at 100, the closing newline, then the
/// message.
#[test]
fn commit_progress_has_qemu_imgs_shape() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    let shape = |prog: &str, name: &str, base: &str| -> (Option<i32>, Vec<String>, String) {
        for (from, to) in [("base.qcow2", base), ("top.qcow2", name)] {
            std::fs::copy(d.join(from), d.join(to)).unwrap();
        }
        sh(
            d,
            "qemu-img",
            &["rebase", "-u", "-b", base, "-F", "qcow2", name],
        );
        let (code, out, err) = outcome(d, prog, &["commit", "-p", name]);
        let (lines, tail) = out.rsplit_once('\r').unwrap_or(("", &out));
        let mut figures: Vec<String> = lines.split('\r').map(str::to_string).collect();
        figures.dedup();
        // The figures strata and QEMU pass through between the ends differ with timing.
        let mut last = 0.0f32;
        for f in &figures {
            let v: f32 = f
                .strip_prefix("    (")
                .and_then(|f| f.strip_suffix("/100%)"))
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("{prog}: not a progress line: {f:?}"));
            assert!(v >= last, "{prog}: the figure fell: {figures:?}");
            last = v;
        }
        let ends = vec![
            figures.first().cloned().unwrap_or_default(),
            figures.last().cloned().unwrap_or_default(),
        ];
        (code, ends, format!("{tail}{err}"))
    };
    let ours = shape("strata", "o-top.qcow2", "o-base.qcow2");
    let theirs = shape("qemu-img", "t-top.qcow2", "t-base.qcow2");
    assert_eq!(ours, theirs);
    assert_eq!(
        theirs.1,
        vec!["    (0.00/100%)".to_string(), "    (100.00/100%)".into()]
    );
    assert_eq!(theirs.2, "\nImage committed.\n");
    // Both bases read the same afterwards and check clean. (Their file lengths
    // may differ by a cluster: where QEMU's commit job places this data depends
    // on the timing of its parallel requests; see img_parity_alloc.)
    for (tool, args) in [
        ("qemu-img", vec!["check", "o-base.qcow2"]),
        (
            "qemu-img",
            vec!["compare", "-U", "o-base.qcow2", "t-base.qcow2"],
        ),
    ] {
        let (code, out, err) = outcome(d, tool, &args);
        assert_eq!(code, Some(0), "commit -p: {args:?}\n{out}{err}");
    }
    // An image that does not open: no progress at all (qemu-img opens it first).
    same(d, &["commit", "-p", "missing.qcow2"]);
    assert_all_same();
}

/// What of `commit -p`'s stdout does not depend on timing: the figures without
/// repeats (the first 0, a figure that never falls, the last 100) and what
/// follows the last carriage return. (How often 0 and 100 repeat does: qemu-img
/// prints once per pass of its job loop, and even "at least twice" failed to
/// hold in one of its runs.)
fn commit_shape(prog: &str, out: &str) -> (Vec<String>, String) {
    let (lines, tail) = out.rsplit_once('\r').unwrap_or(("", out));
    let mut figures: Vec<&str> = lines.split('\r').collect();
    figures.dedup();
    let mut last = 0.0f32;
    for f in &figures {
        let v: f32 = f
            .strip_prefix("    (")
            .and_then(|f| f.strip_suffix("/100%)"))
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("{prog}: not a progress line: {f:?}"));
        assert!(v >= last, "{prog}: the figure fell: {figures:?}");
        last = v;
    }
    let ends = [figures.first(), figures.last()]
        .map(|f| f.map(|s| s.to_string()).unwrap_or_default())
        .to_vec();
    (ends, tail.to_string())
}

/// `commit -p` of chains of 1 MiB to 64 MiB, with a sparse or a fully written
/// top, a middle layer, `-d` and `-b`: qemu-img's lines repeat as often as its
/// event loop wakes (a 1 MiB commit printed 0.00 between 14 and 22 times in
/// runs on the same files), so the shape is compared (see [`commit_shape`]),
/// then the images both tools leave.
#[test]
fn commit_progress_shape_matches_across_sizes_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for size_mib in [1u64, 4, 16, 64] {
        for full in [false, true] {
            for flags in [&[][..], &["-d"], &["-b", "BASE"], &["-d", "-b", "BASE"]] {
                let size = format!("{size_mib}M");
                let half = size_mib * 1024 * 1024 / 2;
                let top_writes = if full {
                    vec![format!("write -P 1 0 {size}")]
                } else {
                    vec![
                        "write -P 1 0 64k".to_string(),
                        format!("write -P 2 {half} 64k"),
                    ]
                };
                let mut results = Vec::new();
                for prog in ["strata", "qemu-img"] {
                    let [base, mid, top] =
                        ["base", "mid", "top"].map(|n| format!("{prog}-{n}.qcow2"));
                    sh(
                        d,
                        "qemu-img",
                        &["create", "-q", "-f", "qcow2", &base, &size],
                    );
                    common::io(d, "qcow2", &base, &["write -P 9 0 1M"]);
                    sh(
                        d,
                        "qemu-img",
                        &[
                            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &mid,
                        ],
                    );
                    common::io(d, "qcow2", &mid, &[format!("write -P 3 {half} 128k")]);
                    sh(
                        d,
                        "qemu-img",
                        &[
                            "create", "-q", "-f", "qcow2", "-b", &mid, "-F", "qcow2", &top,
                        ],
                    );
                    common::io(d, "qcow2", &top, &top_writes);
                    let mut args = vec!["commit", "-p"];
                    args.extend(
                        flags
                            .iter()
                            .map(|f| if *f == "BASE" { base.as_str() } else { f }),
                    );
                    args.push(&top);
                    let (code, out, err) = outcome(d, prog, &args);
                    results.push((code, commit_shape(prog, &out), err.replace(prog, "P")));
                }
                let what = format!("commit -p {} ({size}, full: {full})", flags.join(" "));
                if results[0] != results[1] {
                    differs(format!(
                        "`{what}`\n  strata:   {:?}\n  qemu-img: {:?}",
                        results[0], results[1]
                    ));
                }
                // The layers read alike afterwards.
                for n in ["base", "mid", "top"] {
                    let (o, t) = (format!("strata-{n}.qcow2"), format!("qemu-img-{n}.qcow2"));
                    let (code, out, err) = outcome(d, "qemu-img", &["compare", "-U", &o, &t]);
                    if code != Some(0) {
                        differs(format!("`{what}`: {n} differs: {out}{err}"));
                    }
                }
            }
        }
    }
    assert_all_same();
}
