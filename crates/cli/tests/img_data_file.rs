//! qcow2 images with an external data file (`data_file=`, `data_file_raw=on`):
//! `strata img` prints what qemu-img prints for them (info, map, check, snapshot,
//! convert, amend, create and their refusals), creates the same bytes, and each
//! tool reads what the other wrote.

mod common;

use common::{assert_all_same, io, ok, outcome, same, same_on_copies, sh, verify};
use std::path::Path;

/// Patch `len` bytes at `at` of `src` into a new file `dst` (hostile headers).
fn patched(dir: &Path, src: &str, dst: &str, at: usize, bytes: &[u8]) {
    let mut b = std::fs::read(dir.join(src)).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(dir.join(dst), b).unwrap();
}

/// Images made by qemu-img and qemu-io, with data files beside them.
fn zoo(d: &Path) {
    let q = |args: &[&str]| sh(d, "qemu-img", args);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=df.raw",
        "df.qcow2",
        "4M",
    ]);
    io(
        d,
        "qcow2",
        "df.qcow2",
        &[
            "write -P 0x11 0 100k",
            "write -P 0x22 1M 64k",
            "write -z 2M 64k",
            "write -P 0x33 3M 4k",
            "discard 3M 64k",
        ],
    );
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=raw.raw,data_file_raw=on",
        "raw.qcow2",
        "4M",
    ]);
    io(
        d,
        "qcow2",
        "raw.qcow2",
        &[
            "write -P 0x44 64k 128k",
            "write -z 64k 64k",
            "discard 1M 64k",
        ],
    );
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    io(d, "qcow2", "base.qcow2", &["write -P 0x55 0 2M"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "-o",
        "data_file=over.raw",
        "over.qcow2",
    ]);
    io(d, "qcow2", "over.qcow2", &["write -P 0x66 512k 64k"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=ext.raw,extended_l2=on,cluster_size=128k",
        "ext.qcow2",
        "4M",
    ]);
    io(
        d,
        "qcow2",
        "ext.qcow2",
        &["write -P 0x77 132k 8k", "write -z 1M 128k"],
    );
    // The data file is gone (info still works; everything else fails).
    std::fs::copy(d.join("df.qcow2"), d.join("gone.qcow2")).unwrap();
    sh(
        d,
        "qemu-img",
        &["amend", "-o", "data_file=nowhere.raw", "gone.qcow2"],
    );
    // Hostile headers: the raw bit without a data file, the data file bit without
    // a name, and a name extension whose length runs past the header cluster.
    q(&["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"]);
    patched(d, "plain.qcow2", "rawbit.qcow2", 88, &2u64.to_be_bytes());
    patched(d, "plain.qcow2", "noname.qcow2", 72, &4u64.to_be_bytes());
    patched(
        d,
        "df.qcow2",
        "unknown.qcow2",
        72,
        &(4u64 | 1 << 20).to_be_bytes(),
    );
    patched(
        d,
        "df.qcow2",
        "longext.qcow2",
        0x74,
        &0x1_0000u32.to_be_bytes(),
    );
}

#[test]
fn data_file_images_inspect_and_refuse_as_qemu_img_does() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    zoo(d);
    let images = ["df.qcow2", "raw.qcow2", "over.qcow2", "ext.qcow2"];
    for img in images {
        same(d, &["info", img]);
        same(d, &["info", "--output=json", img]);
        same(d, &["info", "--backing-chain", img]);
        same(d, &["map", img]);
        if img != "ext.qcow2" {
            // Subclusters not yet written in an allocated cluster are reported
            // without their offset: a difference of extended L2 maps in general.
            same(d, &["map", "--output=json", img]);
        }
        same(d, &["check", img]);
        same(d, &["check", "--output=json", img]);
        same(d, &["compare", img, img]);
        same(d, &["snapshot", "-l", img]);
    }
    for img in [
        "gone.qcow2",
        "rawbit.qcow2",
        "noname.qcow2",
        "longext.qcow2",
    ] {
        same(d, &["info", img]);
        same(d, &["map", img]);
        same(d, &["check", img]);
        same(d, &["convert", "-O", "raw", img, "out.raw"]);
    }
    // Refusals: internal snapshots, compressed writes, amends QEMU does not do,
    // creation options that do not go together.
    let mut n = 0;
    let mut on_copy = |img: &str, sub: &str, args: &[&str]| {
        n += 1;
        same_on_copies(d, n, img, sub, args, &[]);
    };
    on_copy("df.qcow2", "snapshot", &["-c", "s1"]);
    on_copy("df.qcow2", "snapshot", &["-a", "s1"]);
    on_copy("df.qcow2", "snapshot", &["-d", "s1"]);
    on_copy("df.qcow2", "amend", &["-o", "compat=0.10"]);
    on_copy("df.qcow2", "amend", &["-o", "data_file_raw=on"]);
    on_copy("plain.qcow2", "amend", &["-o", "data_file=x.raw"]);
    on_copy("plain.qcow2", "amend", &["-o", "data_file_raw=off"]);
    same(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "data_file=c.raw",
            "df.qcow2",
            "c.qcow2",
        ],
    );
    for opts in [
        "data_file_raw=on",
        "data_file=x.raw,compat=0.10",
        "data_file=x.raw,data_file_raw=maybe",
    ] {
        same(d, &["create", "-f", "qcow2", "-o", opts, "new.qcow2", "1M"]);
    }
    same(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "data_file=x.raw,data_file_raw=on",
            "new.qcow2",
        ],
    );
    assert_all_same();
}

/// Run `qemu-img` and `strata img` with `args` in their own directories `q` and
/// `s` of `d` (the same relative names), requiring the same output.
fn in_twin_dirs(d: &Path, args: &[&str]) {
    let (q, s) = (d.join("q"), d.join("s"));
    std::fs::create_dir_all(&q).unwrap();
    std::fs::create_dir_all(&s).unwrap();
    assert_eq!(
        outcome(&s, "strata", args),
        outcome(&q, "qemu-img", args),
        "{args:?}"
    );
}

/// The files `names` are byte for byte the same in `d/q` and `d/s`.
fn twins_equal(d: &Path, names: &[&str], what: &str) {
    for n in names {
        let a = std::fs::read(d.join("q").join(n)).unwrap();
        let b = std::fs::read(d.join("s").join(n)).unwrap();
        assert!(
            a == b,
            "{what}: {n} differs ({} vs {} bytes)",
            a.len(),
            b.len()
        );
    }
}

#[test]
fn create_resize_and_amend_write_the_bytes_qemu_img_writes() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let cases: &[&str] = &[
        "data_file=d.raw",
        "data_file=d.raw,data_file_raw=on",
        "data_file=d.raw,preallocation=metadata",
        "data_file=d.raw,preallocation=falloc",
        "data_file=d.raw,preallocation=full",
        "data_file=d.raw,cluster_size=4k,lazy_refcounts=on",
        "data_file=d.raw,extended_l2=on",
    ];
    for opts in cases {
        in_twin_dirs(d, &["create", "-f", "qcow2", "-o", opts, "i.qcow2", "3M"]);
        twins_equal(d, &["i.qcow2", "d.raw"], opts);
        in_twin_dirs(d, &["resize", "i.qcow2", "5M"]);
        twins_equal(d, &["i.qcow2", "d.raw"], &format!("{opts}: grown"));
        // A shrink leaves the same data file; strata may also give back the
        // qcow2 file's free tail, so that image is compared as QEMU reads it.
        in_twin_dirs(d, &["resize", "--shrink", "i.qcow2", "1M"]);
        twins_equal(d, &["d.raw"], &format!("{opts}: shrunk"));
        ok(&d.join("s"), "qemu-img", &["check", "i.qcow2"]);
        let theirs = d.join("q").join("i.qcow2");
        ok(
            &d.join("s"),
            "qemu-img",
            &["compare", "i.qcow2", theirs.to_str().unwrap()],
        );
        // Amends: the same header bytes.
        std::fs::copy(&theirs, d.join("s").join("i.qcow2")).unwrap();
        in_twin_dirs(d, &["amend", "-o", "data_file_raw=off", "i.qcow2"]);
        in_twin_dirs(d, &["amend", "-o", "data_file=e.raw", "i.qcow2"]);
        twins_equal(d, &["i.qcow2"], &format!("{opts}: amended"));
    }
    // An existing data file is truncated and reused, as qemu-img does.
    for dir in ["q", "s"] {
        std::fs::write(d.join(dir).join("old.raw"), vec![0xaa; 70_000]).unwrap();
    }
    in_twin_dirs(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=old.raw",
            "o.qcow2",
            "1M",
        ],
    );
    twins_equal(d, &["o.qcow2", "old.raw"], "existing data file");
}

#[test]
fn each_tool_reads_what_the_other_wrote_through_a_data_file() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "src.raw", "6M"],
    );
    io(
        d,
        "raw",
        "src.raw",
        &[
            "write -P 0x0a 0 70k",
            "write -P 0x0b 1M 1M",
            "write -P 0x0c 5M 3k",
        ],
    );
    for opts in ["data_file=s.raw", "data_file=s.raw,data_file_raw=on"] {
        // strata writes (convert into a new data-file image), QEMU reads.
        let _ = std::fs::remove_file(d.join("s.qcow2"));
        ok(
            d,
            "strata",
            &["convert", "-O", "qcow2", "-o", opts, "src.raw", "s.qcow2"],
        );
        verify(d, "src.raw", "s.qcow2");
        if opts.contains("raw=on") {
            // The data file alone is the disk.
            ok(
                d,
                "qemu-img",
                &["compare", "-f", "raw", "-F", "raw", "src.raw", "s.raw"],
            );
        }
        // QEMU writes into it, strata reads.
        io(
            d,
            "qcow2",
            "s.qcow2",
            &["write -P 0x0d 64k 4k", "write -z 1M 64k"],
        );
        io(
            d,
            "raw",
            "src.raw",
            &["write -P 0x0d 64k 4k", "write -z 1M 64k"],
        );
        ok(
            d,
            "strata",
            &["convert", "-O", "raw", "s.qcow2", "back.raw"],
        );
        ok(
            d,
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", "src.raw", "back.raw"],
        );
        ok(d, "strata", &["compare", "s.qcow2", "src.raw"]);
        // strata writes into QEMU's image: a commit from an overlay.
        let _ = std::fs::remove_file(d.join("top.qcow2"));
        sh(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "s.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        );
        let writes = [
            "write -P 0x0e 0 4k",
            "write -P 0x0f 3M 200k",
            "write -z 5M 64k",
        ];
        io(d, "qcow2", "top.qcow2", &writes);
        io(d, "raw", "src.raw", &writes);
        ok(d, "strata", &["commit", "top.qcow2"]);
        verify(d, "src.raw", "s.qcow2");
        if opts.contains("raw=on") {
            ok(
                d,
                "qemu-img",
                &["compare", "-f", "raw", "-F", "raw", "src.raw", "s.raw"],
            );
        }
        // And strata's convert of QEMU's data-file image into one of its own.
        let _ = std::fs::remove_file(d.join("c.qcow2"));
        ok(
            d,
            "strata",
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "data_file=c.raw",
                "s.qcow2",
                "c.qcow2",
            ],
        );
        verify(d, "src.raw", "c.qcow2");
    }
}

#[test]
fn a_data_file_named_by_option_is_opened_instead_of_the_recorded_one_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    zoo(d);
    // The data file was moved: the name the image records is gone.
    std::fs::rename(d.join("df.raw"), d.join("moved.raw")).unwrap();
    let img = "driver=qcow2,file.filename=df.qcow2";
    let names = [
        format!("{img},data-file.filename=moved.raw"),
        format!("{img},data-file.driver=file,data-file.filename=moved.raw,data-file.locking=off"),
        format!("{img},data-file.driver=raw,data-file.file.filename=moved.raw"),
        format!("{img},data-file.filename=missing.raw"),
        format!("{img},data-file.filename=moved.raw,data-file.foo=bar"),
        format!("{img},data-file=node0"),
        img.to_string(),
        "driver=qcow2,file.filename=base.qcow2,data-file.filename=moved.raw".to_string(),
    ];
    let json = r#"json:{"driver":"qcow2","file":{"filename":"df.qcow2"},"data-file":{"driver":"file","filename":"moved.raw"}}"#;
    let subs: [&[&str]; 6] = [
        &["info"],
        &["info", "--output=json"],
        &["map"],
        &["map", "--output=json"],
        &["check"],
        &["check", "--output=json"],
    ];
    for n in &names {
        for sub in subs {
            same(d, &[sub, &["--image-opts", n.as_str()]].concat());
        }
        same(
            d,
            &[
                "compare",
                "--image-opts",
                n,
                "driver=qcow2,file.filename=base.qcow2",
            ],
        );
    }
    for sub in subs {
        same(d, &[sub, &[json]].concat());
    }
    same(d, &["compare", json, "base.qcow2"]);
    same(d, &["measure", "-O", "qcow2", json]);
    // Read through the option, each tool's copy holds the guest's data.
    for (tool, out) in [("strata", "s.raw"), ("qemu-img", "q.raw")] {
        ok(
            d,
            tool,
            &["convert", "-O", "raw", "--image-opts", &names[0], out],
        );
    }
    sh(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "s.raw", "q.raw"],
    );
    let (code, _, err) = outcome(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", "s.raw", "base.qcow2"],
    );
    assert_eq!(code, Some(1), "the data came from the data file: {err}");
    // Resized through the option, the moved data file grows with the image and
    // takes later writes alike.
    for (tool, img) in [("strata", "w-s"), ("qemu-img", "w-t")] {
        std::fs::copy(d.join("df.qcow2"), d.join(format!("{img}.qcow2"))).unwrap();
        std::fs::copy(d.join("moved.raw"), d.join(format!("{img}.raw"))).unwrap();
        let name = format!("driver=qcow2,file.filename={img}.qcow2,data-file.filename={img}.raw");
        ok(d, tool, &["resize", "--image-opts", &name, "8M"]);
        ok(
            d,
            "qemu-img",
            &[
                "convert",
                "-n",
                "-f",
                "raw",
                "s.raw",
                "--target-image-opts",
                &name,
            ],
        );
    }
    sh(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "w-s.raw", "w-t.raw"],
    );
    let info = |f: &str| ok(d, "qemu-img", &["info", "--output=json", f]).replace(f, "IMG");
    let lines = |s: String| -> Vec<String> {
        s.lines()
            .filter(|l| !l.contains("actual-size"))
            .map(String::from)
            .collect()
    };
    assert_eq!(lines(info("w-s.qcow2")), lines(info("w-t.qcow2")));
    // Subcommands that reopen the image by its file name refuse the option
    // rather than write into the file the image records.
    let name = "driver=qcow2,file.filename=w-s.qcow2,data-file.filename=w-s.raw";
    for refused in [
        &["commit", "--image-opts", name][..],
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "s.raw",
            "--target-image-opts",
            name,
        ],
    ] {
        let (code, _, err) = outcome(d, "strata", refused);
        assert_eq!(code, Some(1), "{refused:?}");
        assert!(
            err.contains("does not support the option 'data-file' here yet"),
            "{err}"
        );
    }
    for img in ["w-s", "w-t"] {
        let name = format!("driver=qcow2,file.filename={img}.qcow2,data-file.filename={img}.raw");
        ok(d, "qemu-img", &["check", "--image-opts", &name]);
        ok(
            d,
            "qemu-img",
            &[
                "compare",
                "--image-opts",
                &name,
                "driver=raw,file.filename=s.raw",
            ],
        );
    }
    assert_all_same();
}
