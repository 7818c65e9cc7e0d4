//! Scripts written for qemu-img, in the shapes QEMU's own shell tests give
//! them: `compare` of images that differ in size, content or allocation;
//! `commit` into each layer of a chain; `convert` into existing images and
//! with the source's persistent bitmaps; `rebase` onto a new base with zero
//! clusters; files that are not regular files; and the cache modes every
//! subcommand checks. Both tools run the same commands on the same (or
//! identically made) files and must print the same bytes and leave images
//! QEMU reads alike.

mod common;

use common::{assert_all_same, differs, io, map_json, outcome, qcow2, same, sh};
use std::path::{Path, PathBuf};

/// One directory for each tool under `root`, made alike by `setup`, in which
/// [`in_each`] runs `steps`. Returns the two directories (strata's, qemu-img's).
fn in_both(root: &Path, setup: &dyn Fn(&Path), steps: &[&[&str]]) -> (PathBuf, PathBuf) {
    let [a, b] = ["strata", "qemu-img"].map(|prog| {
        let d = root.join(prog);
        std::fs::create_dir_all(&d).unwrap();
        setup(&d);
        d
    });
    let dirs = (a, b);
    in_each(&dirs, steps);
    dirs
}

/// Run each command of `steps` with each tool in its directory of `dirs`, and
/// record any difference in what they print.
fn in_each(dirs: &(PathBuf, PathBuf), steps: &[&[&str]]) {
    for args in steps {
        let ours = outcome(&dirs.0, "strata", args);
        let theirs = outcome(&dirs.1, "qemu-img", args);
        if ours != theirs {
            differs(format!(
                "`img {}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}",
                args.join(" ")
            ));
        }
    }
}

/// Drop what the tools may lay out apart on disk from `info --output=json`:
/// the allocated sizes and the files' lengths (QEMU punches holes where strata
/// may leave zeroes, and places metadata in its own order).
fn without_layout(v: &mut serde_json::Value) {
    if let Some(o) = v.as_object_mut() {
        o.remove("actual-size");
        if o.get("format").and_then(|f| f.as_str()) == Some("file") {
            o.remove("virtual-size");
        }
        o.values_mut().for_each(without_layout);
    } else if let Some(a) = v.as_array_mut() {
        a.iter_mut().for_each(without_layout);
    }
}

/// What QEMU sees of `f` in `dir`: its `info --output=json` (see
/// [`without_layout`]), its map, and its check but for the end offset.
fn seen(dir: &Path, f: &str) -> String {
    let (_, out, err) = outcome(dir, "qemu-img", &["info", "--output=json", f]);
    let info = match serde_json::from_str::<serde_json::Value>(&out) {
        Ok(mut v) => {
            without_layout(&mut v);
            v.to_string()
        }
        Err(_) => out,
    };
    let (code, check, cerr) = outcome(dir, "qemu-img", &["check", f]);
    let check: Vec<&str> = check
        .lines()
        .filter(|l| !l.starts_with("Image end offset"))
        .collect();
    format!(
        "{info}{err}\n{}{code:?} {}{cerr}",
        map_json(dir, f),
        check.join("\n")
    )
}

/// The images `files` of the two directories of [`in_both`] are seen alike.
fn alike(dirs: &(PathBuf, PathBuf), files: &[&str], what: &str) {
    for f in files {
        let (ours, theirs) = (seen(&dirs.0, f), seen(&dirs.1, f));
        if ours != theirs {
            differs(format!("{what}: {f}\n{ours}\n---\n{theirs}"));
        }
    }
}

/// `compare` of identical images, of images of different sizes (with and
/// without -s), of different contents (the first differing offset, also
/// inside a cluster), of zero clusters against unallocated ones under -s, and
/// its refusal of a cache mode it does not know.
#[test]
fn compare_reports_sizes_contents_and_allocation_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2(d, "a.qcow2", "128M", &["-o", "cluster_size=4096"]);
    let writes: Vec<String> = (0..4)
        .map(|i| format!("write -P {} {} 4096", 45 + i, 524288 + 8192 * i))
        .collect();
    io(d, "qcow2", "a.qcow2", &writes);
    std::fs::copy(d.join("a.qcow2"), d.join("b.qcow2")).unwrap();
    let pair = ["a.qcow2", "b.qcow2"];
    let both = |extra: &[&'static str]| {
        let mut a = vec!["compare"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&pair);
        a
    };
    for extra in [&[][..], &["-q"], &["-s"]] {
        same(d, &both(extra));
    }
    sh(
        d,
        "qemu-img",
        &["resize", "-q", "-f", "qcow2", "a.qcow2", "+32M"],
    );
    io(d, "qcow2", "a.qcow2", &["write -z 128M 32M"]);
    for extra in [&[][..], &["-s"], &["-q"], &["-f", "qcow2", "-F", "qcow2"]] {
        same(d, &both(extra));
    }
    same(d, &["compare", "-s", "b.qcow2", "a.qcow2"]);
    io(d, "qcow2", "a.qcow2", &["write -P 67 1228800 4096"]);
    same(d, &both(&[]));
    io(d, "qcow2", "a.qcow2", &["write -P 123 0 4096"]);
    for extra in [&[][..], &["-f", "raw"], &["-q"]] {
        same(d, &both(extra));
    }
    qcow2(d, "u.qcow2", "128M", &[]);
    io(d, "qcow2", "u.qcow2", &["write -P 100 0 512"]);
    std::fs::copy(d.join("u.qcow2"), d.join("v.qcow2")).unwrap();
    io(d, "qcow2", "u.qcow2", &["write -P 101 512 512"]);
    same(d, &["compare", "u.qcow2", "v.qcow2"]);
    same(d, &["compare", "-s", "-q", "v.qcow2", "u.qcow2"]);
    qcow2(d, "z.qcow2", "4M", &[]);
    qcow2(d, "e.qcow2", "4M", &[]);
    io(d, "qcow2", "z.qcow2", &["write -z 64k 64k"]);
    io(d, "qcow2", "e.qcow2", &["write -P 0 1M 64k"]);
    sh(d, "truncate", &["-s", "4M", "r.raw"]);
    for args in [
        &["compare", "z.qcow2", "e.qcow2"][..],
        &["compare", "-s", "z.qcow2", "e.qcow2"],
        &["compare", "-s", "e.qcow2", "z.qcow2"],
        &["compare", "-s", "r.raw", "z.qcow2"],
        &["compare", "-T", "none", "r.raw", "z.qcow2"],
        &["compare", "-T", "foo", "r.raw", "z.qcow2"],
        &["compare", "-T", "foo", "r.raw"],
    ] {
        same(d, args);
    }
    assert_all_same();
}

/// Every subcommand that takes a cache mode refuses one QEMU does not know,
/// in its own words and with its own exit code, at the point qemu-img does.
#[test]
fn unknown_cache_modes_are_refused_by_every_subcommand_as_qemu_img_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let setup = |d: &Path| {
        qcow2(d, "a.qcow2", "4M", &[]);
        qcow2(d, "o.qcow2", "4M", &["-b", "a.qcow2", "-F", "qcow2"]);
    };
    in_both(
        dir.path(),
        &setup,
        &[
            &["check", "-T", "foo", "a.qcow2"],
            &["check", "-T", "none", "a.qcow2"],
            &["check", "-T", "foo", "-r", "foo", "a.qcow2"],
            &["compare", "-T", "foo", "a.qcow2", "o.qcow2"],
            &["rebase", "-t", "foo", "-T", "bar", "-b", "", "o.qcow2"],
            &["rebase", "-T", "bar", "-b", "", "missing.qcow2"],
            &["rebase", "-T", "bar", "-u", "-b", "", "o.qcow2"],
            &["rebase", "-t", "foo", "o.qcow2"],
            &["amend", "-t", "foo", "-o", "lazy_refcounts=on", "a.qcow2"],
            &["amend", "-t", "foo", "-o", "help", "a.qcow2"],
            &["amend", "-t", "foo", "a.qcow2"],
            &["commit", "-t", "foo", "o.qcow2"],
            &["convert", "-T", "foo", "a.qcow2", "x.raw"],
            &["bench", "-t", "foo", "a.qcow2"],
            &["info", "o.qcow2"],
        ],
    );
    assert_all_same();
}

/// A chain of three (base, intermediate, top): `commit` into the first backing
/// file empties the top, `commit -b` of that file or `commit -d` leaves it,
/// and `commit -b` of the base leaves both layers above it; every layer then
/// maps as qemu-img leaves it.
#[test]
fn commit_into_each_layer_of_a_chain_leaves_what_qemu_img_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let setup = |d: &Path| {
        qcow2(d, "base.qcow2", "6G", &[]);
        qcow2(d, "itmd.qcow2", "6G", &["-b", "base.qcow2", "-F", "qcow2"]);
        qcow2(d, "top.qcow2", "6G", &["-b", "itmd.qcow2", "-F", "qcow2"]);
        io(
            d,
            "qcow2",
            "base.qcow2",
            &["write -P 1 0 192k", "write -P 1 4G 64k"],
        );
        io(
            d,
            "qcow2",
            "itmd.qcow2",
            &["write -P 2 64k 128k", "write -P 2 4G 512"],
        );
        io(
            d,
            "qcow2",
            "top.qcow2",
            &["write -P 3 128k 64k", "write -P 3 4G 1k"],
        );
    };
    let files = ["base.qcow2", "itmd.qcow2", "top.qcow2"];
    for (n, args) in [
        &["commit", "top.qcow2"][..],
        &["commit", "-b", "itmd.qcow2", "top.qcow2"],
        &["commit", "-d", "top.qcow2"],
        &["commit", "-b", "base.qcow2", "top.qcow2"],
        &["commit", "-q", "-b", "top.qcow2", "top.qcow2"],
        &["commit", "-b", "other.qcow2", "top.qcow2"],
        &["commit", "-d", "-b", "base.qcow2", "itmd.qcow2"],
    ]
    .into_iter()
    .enumerate()
    {
        let dirs = in_both(&dir.path().join(n.to_string()), &setup, &[args]);
        alike(&dirs, &files, &args.join(" "));
    }
    assert_all_same();
}

/// `convert -n` needs the target to exist and to be large enough; converting
/// an image out to raw and back into it leaves it as it was.
#[test]
fn convert_into_existing_images_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let setup = |d: &Path| {
        qcow2(d, "t.qcow2", "4M", &[]);
        qcow2(d, "small.qcow2", "2M", &[]);
        io(
            d,
            "qcow2",
            "t.qcow2",
            &["write -P 7 1M 64k", "write -z 2M 64k"],
        );
        sh(d, "truncate", &["-s", "1M", "small.raw"]);
        sh(d, "cp", &["t.qcow2", "copy.qcow2"]);
    };
    let q = ["-f", "qcow2", "-O", "qcow2", "-n"];
    let with = |more: &[&'static str]| {
        let mut a = vec!["convert"];
        a.extend_from_slice(&q);
        a.extend_from_slice(more);
        a
    };
    let steps = [
        with(&["t.qcow2", "missing.qcow2"]),
        with(&["t.qcow2", "copy.qcow2"]),
        vec!["convert", "-f", "qcow2", "-O", "raw", "copy.qcow2", "r.raw"],
        vec![
            "convert", "-f", "raw", "-O", "qcow2", "-n", "r.raw", "t.qcow2",
        ],
        with(&["t.qcow2", "small.qcow2"]),
        vec!["convert", "-O", "raw", "-n", "t.qcow2", "small.raw"],
        with(&["small.qcow2", "t.qcow2"]),
    ];
    let steps: Vec<&[&str]> = steps.iter().map(Vec::as_slice).collect();
    let dirs = in_both(dir.path(), &setup, &steps);
    alike(
        &dirs,
        &["t.qcow2", "copy.qcow2", "small.qcow2"],
        "convert -n",
    );
    assert_all_same();
}

/// A directory is no image: named plainly, with `file:`, with -f, or given to
/// the file or host_device driver, it is refused in qemu-img's words (a plain
/// name takes the file driver, which wants a regular file).
#[test]
fn files_that_are_not_regular_files_are_refused_as_qemu_img_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("dir")).unwrap();
    qcow2(d, "t.qcow2", "1M", &[]);
    for args in [
        &["info", "dir"][..],
        &["info", "--output=json", "dir"],
        &["info", "-f", "raw", "dir"],
        &["info", "-f", "qcow2", "dir"],
        &["info", "file:dir"],
        &["info", "-f", "file", "dir"],
        &["info", "-f", "host_device", "dir"],
        &["info", "--image-opts", "driver=file,filename=dir"],
        &["info", "--image-opts", "driver=host_device,filename=dir"],
        &[
            "info",
            "--image-opts",
            "driver=host_device,filename=t.qcow2",
        ],
        &["map", "dir"],
        &["check", "dir"],
        &["compare", "dir", "t.qcow2"],
        &["convert", "-O", "raw", "dir", "x.raw"],
        &["convert", "-O", "qcow2", "t.qcow2", "dir"],
        &["measure", "-O", "qcow2", "dir"],
        // Not yet: a device named plainly is described with the file
        // driver's protocol type, where QEMU opens it with host_device.
    ] {
        same(d, args);
    }
    assert_all_same();
}

/// `rebase -b ""` of an image without a backing file changes nothing;
/// `rebase` onto a new base that holds data where the image reads zeroes
/// writes zero clusters there (and no more), as qemu-img does.
#[test]
fn rebase_onto_a_new_base_writes_the_zero_clusters_qemu_img_writes() {
    let dir = tempfile::tempdir().unwrap();
    let setup = |d: &Path| {
        qcow2(d, "t.qcow2", "384k", &[]);
        qcow2(d, "new.qcow2", "384k", &[]);
        let t = ["write -P 0x22 0 128k", "write -P 0x11 128k 128k"];
        io(d, "qcow2", "t.qcow2", &t);
        let new = [
            "write -P 0x11 0 64k",
            "write -P 0x11 128k 64k",
            "write -P 0x11 256k 64k",
        ];
        io(d, "qcow2", "new.qcow2", &new);
    };
    let dirs = in_both(dir.path(), &setup, &[&["rebase", "-b", "", "t.qcow2"]]);
    alike(&dirs, &["t.qcow2"], "rebase -b ''");
    in_each(
        &dirs,
        &[
            &["rebase", "-b", "new.qcow2", "t.qcow2"],
            &["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"],
        ],
    );
    alike(&dirs, &["t.qcow2", "new.qcow2"], "rebase -b new.qcow2");
    assert_all_same();
}

/// A qcow2 image of 1 EiB is refused at creation, and a header claiming that
/// size is refused by every subcommand that opens the image.
#[test]
fn images_of_an_exbibyte_are_refused_as_qemu_img_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    same(d, &["create", "-f", "qcow2", "huge.qcow2", "1048576T"]);
    qcow2(d, "h.qcow2", "4G", &[]);
    let mut bytes = std::fs::read(d.join("h.qcow2")).unwrap();
    bytes[24..32].copy_from_slice(&(1u64 << 60).to_be_bytes());
    std::fs::write(d.join("h.qcow2"), bytes).unwrap();
    for args in [
        &["info", "h.qcow2"][..],
        &["check", "h.qcow2"],
        &["map", "h.qcow2"],
        &["convert", "-O", "raw", "h.qcow2", "x.raw"],
    ] {
        same(d, args);
    }
    assert_all_same();
}

/// The image of QEMU's bitmap tests: a base with one bitmap, and an overlay
/// with an active and an inactive one, cleared, disabled and enabled between
/// writes.
fn bitmapped(d: &Path) {
    qcow2(d, "base.qcow2", "10M", &[]);
    sh(
        d,
        "qemu-img",
        &["bitmap", "--add", "-f", "qcow2", "base.qcow2", "b0"],
    );
    io(d, "qcow2", "base.qcow2", &["write 3M 1M"]);
    qcow2(d, "orig.qcow2", "10M", &["-b", "base.qcow2", "-F", "qcow2"]);
    let bitmap = |args: &[&str]| {
        let (name, ops) = args.split_last().unwrap();
        let mut a = vec!["bitmap"];
        a.extend_from_slice(ops);
        a.extend_from_slice(&["-f", "qcow2", "orig.qcow2", name]);
        sh(d, "qemu-img", &a);
    };
    io(d, "qcow2", "orig.qcow2", &["write 0 1M"]);
    bitmap(&["--add", "-g", "512k", "b1"][..]);
    bitmap(&["--add", "--disable", "b2"]);
    io(d, "qcow2", "orig.qcow2", &["write 3M 1M"]);
    bitmap(&["--clear", "b1"]);
    io(d, "qcow2", "orig.qcow2", &["write 1M 1M"]);
    bitmap(&["--disable", "b1"]);
    bitmap(&["--enable", "b2"]);
    io(d, "qcow2", "orig.qcow2", &["write 2M 1M"]);
}

/// `convert --bitmaps` copies the source's own bitmaps (not its backing
/// file's) into a qcow2 target, where they can be merged and removed; a raw or
/// version 2 target, several sources, or a bitmap left in use by a writer
/// that died are refused (or, with --skip-broken-bitmaps, the broken bitmap
/// left out with a warning).
#[test]
fn convert_copies_persistent_bitmaps_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let opts = "driver=qcow2,file.driver=file,file.filename=t.qcow2";
    let dirs = in_both(
        dir.path(),
        &bitmapped,
        &[
            &["convert", "--bitmaps", "-O", "raw", "orig.qcow2", "t.raw"],
            &[
                "convert",
                "--skip-broken-bitmaps",
                "-O",
                "qcow2",
                "orig.qcow2",
                "s.qcow2",
            ],
            &[
                "convert",
                "--bitmaps",
                "-O",
                "qcow2",
                "orig.qcow2",
                "base.qcow2",
                "m.qcow2",
            ],
            &[
                "convert",
                "--bitmaps",
                "-O",
                "qcow2",
                "-o",
                "compat=0.10",
                "orig.qcow2",
                "v2.qcow2",
            ],
            &[
                "convert",
                "--bitmaps",
                "-O",
                "qcow2",
                "orig.qcow2",
                "t.qcow2",
            ],
            &[
                "bitmap",
                "--add",
                "--disable",
                "-f",
                "qcow2",
                "t.qcow2",
                "b0",
            ],
            &[
                "bitmap",
                "--add",
                "--merge",
                "b0",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "-f",
                "qcow2",
                "t.qcow2",
                "tmp",
            ],
            &["bitmap", "--merge", "tmp", "-f", "qcow2", "t.qcow2", "b0"],
            &["bitmap", "--remove", "--image-opts", opts, "tmp"],
            &[
                "convert",
                "--bitmaps",
                "-O",
                "qcow2",
                "-n",
                "orig.qcow2",
                "t.qcow2",
            ],
            &["rebase", "-u", "-F", "qcow2", "-b", "base.qcow2", "t.qcow2"],
            &[
                "bitmap",
                "--add",
                "--merge",
                "b2",
                "-b",
                "t.qcow2",
                "-F",
                "qcow2",
                "-f",
                "qcow2",
                "base.qcow2",
                "b3",
            ],
            &["convert", "--bitmaps", "-O", "qcow2", "t.qcow2", "c.qcow2"],
        ],
    );
    alike(
        &dirs,
        &["t.qcow2", "base.qcow2", "c.qcow2", "v2.qcow2"],
        "bitmaps",
    );
    // A writer that dies with the image open leaves its bitmaps in use.
    for d in [&dirs.0, &dirs.1] {
        let out = std::process::Command::new("qemu-io")
            .args(["-c", "abort", "t.qcow2"])
            .current_dir(d)
            .output()
            .expect("qemu-io must be installed");
        assert!(!out.status.success(), "qemu-io was to abort");
    }
    in_each(
        &dirs,
        &[
            &[
                "convert",
                "--bitmaps",
                "-O",
                "qcow2",
                "t.qcow2",
                "copy.qcow2",
            ],
            &["info", "copy.qcow2"],
            &[
                "convert",
                "--bitmaps",
                "--skip-broken-bitmaps",
                "-O",
                "qcow2",
                "t.qcow2",
                "copy.qcow2",
            ],
        ],
    );
    alike(&dirs, &["copy.qcow2"], "bitmaps skipped");
    assert_all_same();
}
