//! Behaviours scripts written for qemu-img rely on, in the shapes QEMU's own
//! shell tests use them: `convert` with a backing file for the target (`-B`, or
//! `-o backing_file=`), into existing images (`-n`) and compressed (`-c`, `-S 0`);
//! failures to open a backing file at any depth of a chain; option lists and
//! snapshot parameters refused as qemu-img reads them; refusals of `rebase`,
//! `commit`, `check` and `measure`. Both tools run the same commands on the same
//! files and must print the same bytes and leave images QEMU reads alike.

mod common;

use common::{
    assert_all_same, differs, io, map_json, ok, qcow2, same, same_bytes, same_image,
    same_on_copies, sh,
};
use std::path::Path;

/// Run `convert ARGS... OUT` with both tools (each on its own copy of `img` as the
/// output, for -n), then require the same messages, outputs QEMU reads alike
/// with the same map, and (when given) the guest data of `src`.
fn converted(d: &Path, n: usize, img: &str, args: &[&str], src: Option<&str>) {
    let (ours, theirs) = same_on_copies(d, n, img, "convert", args, &[]);
    let what = format!("convert {}", args.join(" "));
    same_image(d, &ours, &theirs, &what);
    let (m_ours, m_theirs) = (map_json(d, &ours), map_json(d, &theirs));
    if m_ours != m_theirs {
        differs(format!("{what}: map\n{m_ours}---\n{m_theirs}"));
    }
    if let Some(src) = src {
        ok(d, "qemu-img", &["compare", src, &ours]);
    }
}

/// The target's backing file comes from -B or from `-o backing_file=`, its format
/// from -F or `-o backing_fmt=`; either way only the source's top layer is
/// copied, and the refusals (raw targets, concatenation, no format, -o with -n)
/// come in qemu-img's order.
#[test]
fn convert_takes_the_target_backing_file_from_b_or_o_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2(d, "base.qcow2", "64M", &[]);
    io(d, "qcow2", "base.qcow2", &["write -P 0x11 0 64M"]);
    qcow2(d, "top.qcow2", "64M", &["-b", "base.qcow2", "-F", "qcow2"]);
    io(
        d,
        "qcow2",
        "top.qcow2",
        &["write -P 0x22 0 3M", "write -z 8M 1M"],
    );
    qcow2(d, "s2.qcow2", "4M", &[]);
    qcow2(d, "out.qcow2", "64M", &[]);

    for (n, args) in [
        &[
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-o",
            "backing_fmt=qcow2",
            "top.qcow2",
        ][..],
        &[
            "-O",
            "qcow2",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            "top.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            "-c",
            "-B",
            "base.qcow2",
            "-o",
            "backing_fmt=qcow2",
            "top.qcow2",
        ],
        &["-O", "qcow2", "-B", "base.qcow2", "-n", "top.qcow2"],
    ]
    .into_iter()
    .enumerate()
    {
        converted(d, n, "out.qcow2", args, None);
    }

    for args in [
        &[
            "-O",
            "qcow2",
            "-o",
            "backing_file=base.qcow2",
            "top.qcow2",
            "o.qcow2",
        ][..],
        &[
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "top.qcow2",
            "s2.qcow2",
            "o.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "backing_file=base.qcow2",
            "top.qcow2",
            "s2.qcow2",
            "o.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            "-c",
            "-B",
            "base.qcow2",
            "top.qcow2",
            "s2.qcow2",
            "o.qcow2",
        ],
        &[
            "-O",
            "raw",
            "-c",
            "-B",
            "base.qcow2",
            "top.qcow2",
            "s2.qcow2",
            "o.raw",
        ],
        &["-O", "raw", "-F", "qcow2", "top.qcow2", "o.raw"],
        &["-O", "raw", "-c", "top.qcow2", "missing.qcow2", "o.raw"],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-n",
            "top.qcow2",
            "out.qcow2",
        ],
        &["-O", "qcow2", "-n", "-o", "help", "top.qcow2", "out.qcow2"],
        &["-n", "-o", "x"],
    ] {
        let args: Vec<&str> = std::iter::once("convert")
            .chain(args.iter().copied())
            .collect();
        same(d, &args);
    }
    assert_all_same();
}

/// `convert -n` zeroes what the source reads as zeroes even where the target's
/// backing file holds data: a version 2 target has no zero flag, so the zeroes
/// are written (the ranges must not be left to show the backing data through).
#[test]
fn convert_into_an_existing_v2_overlay_hides_its_backing_data_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2(d, "src.qcow2", "1M", &[]);
    io(d, "qcow2", "src.qcow2", &["write -P 0x11 16k 16k"]);
    qcow2(d, "base.qcow2", "1M", &[]);
    io(d, "qcow2", "base.qcow2", &["write -P 0x55 0 1M"]);
    for compat in ["0.10", "1.1"] {
        let t = format!("t{}.qcow2", compat.replace('.', ""));
        let opts = format!("compat={compat}");
        let b = ["-o", &opts, "-b", "base.qcow2", "-F", "qcow2"];
        qcow2(d, &t, "1M", &b);
        converted(
            d,
            0,
            &t,
            &["-n", "-O", "qcow2", "src.qcow2"],
            Some("src.qcow2"),
        );
    }
    assert_all_same();
}

/// `convert -c` compresses every cluster that holds data, also one the source
/// fills only in part (a sparse raw file, a source with smaller clusters), and
/// with -S 0 the zero clusters too (a fully allocated output).
#[test]
fn convert_compresses_partly_filled_and_zero_clusters_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(d, "truncate", &["-s", "1M", "sparse.raw"]);
    io(
        d,
        "raw",
        "sparse.raw",
        &["write -P 0x61 8k 3k", "write -P 0x62 200k 1k"],
    );
    qcow2(d, "small.qcow2", "1M", &["-o", "cluster_size=4k"]);
    io(
        d,
        "qcow2",
        "small.qcow2",
        &["write -P 0x11 8k 4k", "write -P 0 64k 4k"],
    );
    qcow2(d, "mixed.qcow2", "4M", &[]);
    io(
        d,
        "qcow2",
        "mixed.qcow2",
        &["write -P 0x22 0 1M", "write -P 0 1M 1M"],
    );
    qcow2(d, "out.qcow2", "1M", &[]);
    for (n, args) in [
        &["-c", "-O", "qcow2", "sparse.raw"][..],
        &["-c", "-O", "qcow2", "-f", "raw", "sparse.raw"],
        &["-c", "-O", "qcow2", "small.qcow2"],
        &["-c", "-O", "qcow2", "-o", "cluster_size=16k", "small.qcow2"],
        &["-c", "-S", "0", "-O", "qcow2", "mixed.qcow2"],
        &["-c", "-S", "8k", "-O", "qcow2", "mixed.qcow2"],
    ]
    .into_iter()
    .enumerate()
    {
        let src = args[args.len() - 1];
        converted(d, n, "out.qcow2", args, Some(src));
    }
    assert_all_same();
}

/// A backing file that cannot be opened, at any depth, is reported as qemu-img
/// reports it: "Could not open backing file: " once per level below the top, the
/// file named as found; `info --backing-chain` names the failing file itself; a
/// file too short to be qcow2 is "not in qcow2 format".
#[test]
fn backing_files_that_fail_to_open_are_reported_as_qemu_img_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let unsafe_on = |name: &str, backing: &str, fmt: &str| {
        qcow2(d, name, "1M", &["-u", "-b", backing, "-F", fmt]);
    };
    unsafe_on("ov1.qcow2", "gone.qcow2", "qcow2");
    unsafe_on("ov2.qcow2", "ov1.qcow2", "qcow2");
    unsafe_on("ov3.qcow2", "ov2.qcow2", "qcow2");
    unsafe_on("raw-gone.qcow2", "gone.raw", "raw");
    std::fs::write(d.join("short"), b"garbage").unwrap();
    unsafe_on("on-short.qcow2", "short", "qcow2");
    std::fs::create_dir(d.join("sub")).unwrap();
    unsafe_on("sub/ov.qcow2", "../ov1.qcow2", "qcow2");
    qcow2(d, "plain.qcow2", "1M", &[]);
    for img in [
        "ov1.qcow2",
        "ov2.qcow2",
        "ov3.qcow2",
        "raw-gone.qcow2",
        "on-short.qcow2",
        "sub/ov.qcow2",
    ] {
        same(d, &["info", img]);
        same(d, &["info", "--backing-chain", img]);
        same(d, &["info", "--backing-chain", "--output=json", img]);
        same(d, &["map", img]);
        same(d, &["check", img]);
        same(d, &["compare", img, "plain.qcow2"]);
        same(d, &["convert", "-O", "raw", img, "out.raw"]);
        same(d, &["commit", img]);
    }
    same(d, &["info", "-f", "qcow2", "short"]);
    same(d, &["map", "-f", "qcow2", "short"]);
    same(d, &["check", "missing.qcow2"]);
    assert_all_same();
}

/// `-o` lists qemu-img refuses as it reads them (empty, a leading comma, an odd
/// number of trailing commas), `-l` snapshot parameters with unknown keys,
/// `measure`'s arguments that need a file name, and `commit`'s cache mode.
#[test]
fn option_lists_and_snapshot_parameters_are_refused_as_qemu_img_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2(d, "t.qcow2", "1G", &[]);
    qcow2(d, "ov.qcow2", "1G", &["-b", "t.qcow2", "-F", "qcow2"]);
    for list in [
        "",
        ",",
        ",help",
        "cluster_size=4k,",
        "backing_file=t.qcow2,",
    ] {
        same(d, &["create", "-f", "qcow2", "-o", list, "n.qcow2", "1M"]);
        same(
            d,
            &["convert", "-O", "qcow2", "-o", list, "t.qcow2", "n.qcow2"],
        );
        same(d, &["amend", "-o", list, "t.qcow2"]);
        same(d, &["measure", "-O", "qcow2", "-o", list, "--size", "1M"]);
    }
    same(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,,",
            "n.qcow2",
            "1M",
        ],
    );
    for args in [
        &["measure", "--image-opts"][..],
        &["measure", "-f", "qcow2"],
        &["measure", "-l", "snap1"],
        &["measure", "-l", "snapshot.foo"],
        &["measure", "-l", "snapshot.foo=x", "t.qcow2"],
        &["measure", "-l", "snapshot.name=x,snapshot.bar=1", "t.qcow2"],
        &["measure", "--size", "2G", "t.qcow2"],
        &["measure", "t.qcow2", "a"],
        &[
            "convert",
            "-l",
            "snapshot.foo",
            "-O",
            "raw",
            "t.qcow2",
            "n.raw",
        ],
        &[
            "convert",
            "-l",
            "snapshot.name=none",
            "-O",
            "raw",
            "t.qcow2",
            "n.raw",
        ],
        &["commit", "-t", "bogus", "ov.qcow2"],
        &["commit", "-t", "writeback", "-d", "ov.qcow2"],
        &["check", "missing.qcow2"],
    ] {
        same(d, args);
    }
    assert_all_same();
}

/// `rebase` refusals in qemu-img's order: an image whose backing file is gone
/// fails to open before the missing -F is noticed, a new backing file that is
/// gone is named, and a raw image cannot take a backing file.
#[test]
fn rebase_refusals_come_in_qemu_img_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2(d, "b1.qcow2", "1M", &[]);
    qcow2(
        d,
        "lost.qcow2",
        "1M",
        &["-u", "-b", "gone.qcow2", "-F", "qcow2"],
    );
    qcow2(d, "ov.qcow2", "1M", &["-b", "b1.qcow2", "-F", "qcow2"]);
    sh(d, "qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    for (img, args) in [
        ("lost.qcow2", &["-b", "b1.qcow2"][..]),
        ("ov.qcow2", &["-b", "gone.qcow2"]),
        ("ov.qcow2", &["-u", "-b", "gone.qcow2"]),
        ("ov.qcow2", &["-f", "raw", "-b", "b1.qcow2", "-F", "qcow2"]),
        (
            "r.raw",
            &["-f", "raw", "-u", "-b", "b1.qcow2", "-F", "qcow2"],
        ),
    ] {
        let (ours, theirs) = same_on_copies(d, 0, img, "rebase", args, &[]);
        same_bytes(d, &ours, &theirs, &format!("rebase {args:?} {img}"));
    }
    assert_all_same();
}

/// The "Try 'PROG SUB --help'" line names the program as it was run (a path, if
/// one was typed), while the messages' prefix is the bare name.
#[test]
fn the_try_help_line_names_the_program_as_it_was_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let link = d.join("qemu-img");
    std::os::unix::fs::symlink(common::STRATA, &link).unwrap();
    let theirs = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v qemu-img"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let theirs = theirs.trim();
    assert!(!theirs.is_empty(), "qemu-img must be installed");
    for args in [
        &["info"][..],
        &["map", "--output=foo", "x"],
        &["check", "-r", "bogus", "x"],
        &["compare", "x"],
        &["resize", "x"],
        &["rebase", "x"],
        &["create", "-f", "qcow2"],
        &["amend", "x"],
        &["snapshot", "-l", "-c", "a", "x"],
        &["-O", "qcow2", "x"],
        &["--foo", "x"],
    ] {
        let run = |prog: &Path| {
            let o = std::process::Command::new(prog)
                .args(args)
                .current_dir(d)
                .output()
                .unwrap();
            let p = prog.display().to_string();
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stderr).replace(&p, "ARGV0"),
            )
        };
        let (r_ours, r_theirs) = (run(&link), run(Path::new(theirs)));
        if r_ours != r_theirs {
            differs(format!(
                "{args:?}\n  strata:   {r_ours:?}\n  qemu-img: {r_theirs:?}"
            ));
        }
    }
    assert_all_same();
}
