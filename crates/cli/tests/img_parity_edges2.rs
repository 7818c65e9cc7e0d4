//! Corners of qemu-img's wording that scripts meet at the edges: a repair of an
//! image whose backing chain loops back to it; the `host_cdrom` driver on a
//! regular file and on a device without a medium; the file protocol's
//! `extent_size_hint` creation option; backing formats strata lacks but QEMU
//! knows, given to `create -u`, and `rebase` of a raw image. Both tools run the same command
//! on identically made files and must print the same bytes, exit alike and
//! leave the same files.

mod common;

use common::{assert_all_same, differs, outcome, sh};
use std::path::Path;

/// Run `setup` (bash with qemu-img) in two fresh directories under `root` named
/// after `n`, then `args` with strata in the first and qemu-img in the second;
/// record any difference in what they print and in the bytes of the files they
/// leave. Nothing opens the files afterwards: a looping chain would make
/// qemu-img's own readers recurse without end.
fn same_in_twins(root: &Path, n: &str, setup: &str, args: &[&str]) {
    let dirs = [root.join(format!("{n}-o")), root.join(format!("{n}-t"))];
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
        sh(d, "bash", &["-ec", setup]);
    }
    let ours = outcome(&dirs[0], "strata", args);
    let theirs = outcome(&dirs[1], "qemu-img", args);
    if ours != theirs {
        differs(format!(
            "[{n}] `img {}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}",
            args.join(" ")
        ));
    }
    let mut names: Vec<String> = std::fs::read_dir(&dirs[1])
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for f in names {
        let read = |d: &Path| std::fs::read(d.join(&f)).ok();
        if read(&dirs[0]) != read(&dirs[1]) {
            differs(format!("[{n}] `img {}`: {f} differs", args.join(" ")));
        }
    }
}

/// `check -r leaks|all` holds the image for writing before it opens the
/// chain: a chain that comes back to the image (itself, through another file,
/// or spelt `./x` or `../dir/x`) meets the image's own lock, and the repair is
/// refused in qemu-img's words before anything is written.
#[test]
fn check_repair_of_a_chain_looping_to_the_image_meets_its_lock() {
    let t = tempfile::tempdir().unwrap();
    let mk = "qemu-img create -q -f qcow2";
    let setups = [
        (
            "self",
            format!("{mk} a.qcow2 1M; qemu-img rebase -u -F qcow2 -b a.qcow2 a.qcow2"),
        ),
        (
            "dot",
            format!("{mk} a.qcow2 1M; qemu-img rebase -u -F qcow2 -b ./a.qcow2 a.qcow2"),
        ),
        (
            "two",
            format!(
                "{mk} a.qcow2 1M; {mk} b.qcow2 1M; \
                 qemu-img rebase -u -F qcow2 -b b.qcow2 a.qcow2; \
                 qemu-img rebase -u -F qcow2 -b a.qcow2 b.qcow2"
            ),
        ),
        (
            "three",
            format!(
                "{mk} a.qcow2 1M; {mk} b.qcow2 1M; {mk} c.qcow2 1M; \
                 qemu-img rebase -u -F qcow2 -b b.qcow2 a.qcow2; \
                 qemu-img rebase -u -F qcow2 -b c.qcow2 b.qcow2; \
                 qemu-img rebase -u -F qcow2 -b a.qcow2 c.qcow2"
            ),
        ),
        (
            "updir",
            format!(
                "mkdir sub; {mk} sub/a.qcow2 1M; \
                 qemu-img rebase -u -F qcow2 -b ../sub/a.qcow2 sub/a.qcow2"
            ),
        ),
        (
            // A leak to repair: the refusal still comes first.
            "leaky",
            format!(
                "{mk} a.qcow2 1M; qemu-io -f qcow2 -c 'write 0 64k' a.qcow2 >/dev/null; \
                 qemu-img rebase -u -F qcow2 -b a.qcow2 a.qcow2; \
                 printf '\\x00\\x05' | dd of=a.qcow2 bs=1 seek=$((0x20000 + 10)) conv=notrunc 2>/dev/null"
            ),
        ),
    ];
    for (n, setup) in &setups {
        let img = if *n == "updir" {
            "sub/a.qcow2"
        } else {
            "a.qcow2"
        };
        for (i, args) in [
            &["check", "-r", "all", img][..],
            &["check", "-r", "leaks", img],
            &["check", "--output=json", "-r", "all", img],
            &["check", "-q", "-r", "all", img],
            &["check", "-r", "all", "-f", "qcow2", img],
        ]
        .iter()
        .enumerate()
        {
            same_in_twins(t.path(), &format!("{n}{i}"), setup, args);
        }
    }
    let opts = "driver=qcow2,file.filename=a.qcow2";
    same_in_twins(
        t.path(),
        "opts",
        &setups[0].1,
        &["check", "-r", "all", "--image-opts", opts],
    );
    assert_all_same();
}

/// `-f host_cdrom` (and `driver=host_cdrom`) wants a character or block device;
/// on `/dev/null`, a device with no medium, the commands that ask the block
/// backend for a length (map, dd, compare) fail in qemu-img's words, and those
/// that ask the node (info, check, convert, measure) see an empty image.
#[test]
fn host_cdrom_refuses_regular_files_and_has_no_size_without_a_medium() {
    let t = tempfile::tempdir().unwrap();
    let setup = "qemu-img create -q -f raw r.raw 1M";
    let opts_null = "driver=host_cdrom,filename=/dev/null";
    let opts_file = "driver=host_cdrom,filename=r.raw";
    let cases: [&[&str]; 22] = [
        &["info", "-f", "host_cdrom", "r.raw"],
        &["check", "-f", "host_cdrom", "r.raw"],
        &["map", "-f", "host_cdrom", "r.raw"],
        &["convert", "-f", "host_cdrom", "-O", "raw", "r.raw", "o.raw"],
        &["info", "--image-opts", opts_file],
        &["info", "-f", "host_cdrom", "/dev/null"],
        &["info", "--output=json", "-f", "host_cdrom", "/dev/null"],
        &["info", "--image-opts", opts_null],
        &["check", "-f", "host_cdrom", "/dev/null"],
        &["map", "-f", "host_cdrom", "/dev/null"],
        &["map", "--output=json", "-f", "host_cdrom", "/dev/null"],
        &["map", "--image-opts", opts_null],
        &["dd", "-f", "host_cdrom", "if=/dev/null", "of=o.raw"],
        &["dd", "--image-opts", &format!("if={opts_null}"), "of=o.raw"],
        &["compare", "-f", "host_cdrom", "/dev/null", "r.raw"],
        &[
            "compare",
            "-f",
            "host_cdrom",
            "-F",
            "raw",
            "/dev/null",
            "r.raw",
        ],
        &["compare", "-F", "host_cdrom", "r.raw", "/dev/null"],
        &[
            "compare",
            "-f",
            "host_cdrom",
            "-F",
            "host_cdrom",
            "/dev/null",
            "/dev/null",
        ],
        &[
            "convert",
            "-f",
            "host_cdrom",
            "-O",
            "raw",
            "/dev/null",
            "o.raw",
        ],
        &[
            "convert",
            "-f",
            "host_cdrom",
            "-O",
            "qcow2",
            "/dev/null",
            "o.qcow2",
        ],
        &["measure", "-f", "host_cdrom", "-O", "qcow2", "/dev/null"],
        &["convert", "--image-opts", opts_null, "-O", "raw", "o.raw"],
    ];
    for (i, args) in cases.iter().enumerate() {
        same_in_twins(t.path(), &format!("cd{i}"), setup, args);
    }
    assert_all_same();
}

/// `-o extent_size_hint=` is the file protocol's option (raw, qcow2 and luks
/// files, create and convert): a size below 2^64, printed in the summary line
/// as a signed number, refused after that line (and before any file is made)
/// above 32 bits. It is a hint: the files made are the same either way.
#[test]
fn extent_size_hint_is_taken_and_bounded_as_qemu_img_bounds_it() {
    let t = tempfile::tempdir().unwrap();
    let setup = "qemu-img create -q -f raw r.raw 1M";
    let mut n = 0;
    for v in [
        "1M",
        "0",
        "3",
        "1k",
        "-1",
        "huge",
        "",
        "4G",
        "4294967295",
        "4294967296",
        "18446744073709551615",
        "18446744073709551616",
    ] {
        let o = format!("extent_size_hint={v}");
        let both = format!("nocow=off,preallocation=off,{o}");
        for args in [
            &["create", "-f", "raw", "-o", &o, "e.raw", "1M"][..],
            &["create", "-f", "qcow2", "-o", &o, "e.qcow2", "1M"],
            &["create", "-f", "raw", "-o", &both, "e.raw", "1M"],
            &["create", "-f", "qcow2", "-o", &both, "e.qcow2", "1M"],
            &["convert", "-O", "raw", "-o", &o, "r.raw", "c.raw"],
            &["convert", "-O", "qcow2", "-o", &o, "r.raw", "c.qcow2"],
        ] {
            same_in_twins(t.path(), &format!("esh{n}"), setup, args);
            n += 1;
        }
    }
    let luks = [
        "create",
        "-f",
        "luks",
        "--object",
        "secret,id=s,data=x",
        "-o",
        "key-secret=s,iter-time=10,extent_size_hint=1M",
        "e.luks",
        "1M",
    ];
    let (_, out_o, err_o) = outcome(t.path(), "strata", &luks);
    let (_, out_t, err_t) = outcome(t.path(), "qemu-img", &luks);
    if (&out_o, &err_o) != (&out_t, &err_t) {
        differs(format!("luks: {out_o}{err_o} vs {out_t}{err_t}"));
    }
    assert_all_same();
}

/// `create -u -F FMT` records any name QEMU's qcow2 driver takes as a backing
/// format, even one strata cannot open (the backing file is not opened); a
/// name QEMU does not know is refused after the summary line with `-u`, and
/// as an unknown driver without it.
#[test]
fn create_records_backing_formats_qemu_knows_and_refuses_others() {
    let t = tempfile::tempdir().unwrap();
    let setup = "qemu-img create -q -f raw base.raw 1M";
    let mut n = 0;
    for f in [
        "vmdk",
        "vdi",
        "vpc",
        "vhdx",
        "qed",
        "parallels",
        "host_device",
        "dmg",
        "bochs",
        "cloop",
        "file",
        "blkreplay",
        "gluster",
        "iser",
        "io_uring",
        "nosuch",
        "raw",
    ] {
        for args in [
            &[
                "create", "-f", "qcow2", "-F", f, "-u", "-b", "base.raw", "o.qcow2", "1M",
            ][..],
            &[
                "create", "-q", "-f", "qcow2", "-u", "-F", f, "-b", "base.raw", "o.qcow2", "1M",
            ],
        ] {
            same_in_twins(t.path(), &format!("bf{n}"), setup, args);
            n += 1;
        }
    }
    for args in [
        &[
            "create", "-f", "qcow2", "-F", "nosuch", "-b", "base.raw", "o.qcow2", "1M",
        ][..],
        &[
            "create", "-f", "qcow2", "-F", "nosuch", "-b", "base.raw", "o.qcow2",
        ],
    ] {
        same_in_twins(t.path(), &format!("bf{n}"), setup, args);
        n += 1;
    }
    assert_all_same();
}

/// `rebase` of a raw image (which has no backing link): without `-F` the
/// missing format is said first, and in safe mode a missing new backing file
/// before that; the image is left as it was.
#[test]
fn rebase_of_a_raw_image_words_the_first_refusal_as_qemu_img() {
    let t = tempfile::tempdir().unwrap();
    let setup = "qemu-img create -q -f raw base.raw 1M; qemu-img create -q -f raw r.raw 1M";
    for (i, args) in [
        &["rebase", "-f", "raw", "-b", "base.raw", "r.raw"][..],
        &["rebase", "-f", "raw", "-u", "-b", "base.raw", "r.raw"],
        &["rebase", "-f", "raw", "-b", "missing", "r.raw"],
        &["rebase", "-f", "raw", "-u", "-b", "missing", "r.raw"],
        &["rebase", "-f", "raw", "-F", "raw", "-b", "missing", "r.raw"],
        &[
            "rebase", "-f", "raw", "-F", "raw", "-b", "base.raw", "r.raw",
        ],
        &[
            "rebase", "-f", "raw", "-u", "-F", "vmdk", "-b", "base.raw", "r.raw",
        ],
        &["rebase", "-f", "raw", "-b", "", "r.raw"],
        &["rebase", "-f", "raw", "-u", "-b", "", "r.raw"],
        &[
            "rebase", "-f", "raw", "-F", "nosuch", "-b", "base.raw", "r.raw",
        ],
    ]
    .iter()
    .enumerate()
    {
        same_in_twins(t.path(), &format!("rr{i}"), setup, args);
    }
    assert_all_same();
}
